"""Programs built on the library (not imported by it): benchmarks and the default-model builder.

* :mod:`~segrl.programs.bench`: ``segrl bench [sampler|trl|treepo|memory|smollm2|gpu|all]``;
* :mod:`~segrl.programs.bench_treepo`: TreePO tree vs independent sampling;
* :mod:`~segrl.programs.bench_gpu`: rollout, TreePO and GRPO-step figures on one GPU;
* :mod:`~segrl.programs.bench_memory`: peak memory of the update, chunked vs unchunked;
* :mod:`~segrl.programs.bench_smollm2`: a short real GRPO run of SmolLM2-135M;
* :mod:`~segrl.programs.build_default_model`: ``segrl build-default-model``.
"""
