"""Rerun of the run-directory attacks of issue 22 (items 1-4 and 8's resume part) on the tiny
test model; prints the figures recorded in docs/reliability.md.

    python tests/audit_run_dirs.py [--chains 3] [--pairs 5] [--seed 0]

Not a test (minutes of CPU): random-moment SIGKILL chains ending in an exact resume,
concurrent starts on one directory, a resume while the run trains, wrong resumes, tampered
checkpoints (manifest recomputed), a full disk (a 2 MiB tmpfs; root only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_helpers import REPO, env, read_metrics, reward_file, run_cli, step_lines, tiny_model_dir, train_args  # noqa: E402

TIMING = ("step_time", "timing/")


def _same_metrics(a: Path, b: Path) -> bool:
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]  # noqa: E731
    return strip(read_metrics(a)) == strip(read_metrics(b)) and (a / "rollouts.jsonl").read_bytes() == (b / "rollouts.jsonl").read_bytes()


def _popen(args, log):
    return subprocess.Popen([sys.executable, "-m", "segrl.cli", *args], env=env(), cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)


def kill_chains(root: Path, model: Path, rew: str, chains: int, rng: random.Random) -> dict:
    steps = 200  # ~10 s of training after ~5 s of start-up (2 cores)
    ref = root / "kill-ref"
    run_cli(train_args(model, ref, steps=steps, reward=rew), timeout=300)
    kills = identical = 0
    for c in range(chains):
        run = root / f"kill-{c}"
        for _ in range(40):
            started = (run / "config.yaml").exists()  # killed before even that: start again
            args = ["train", "--threads", "1", "--resume", str(run)] if started else train_args(model, run, steps=steps, reward=rew)
            with open(root / f"kill-{c}.log", "a") as log:
                p = _popen(args, log)
                try:
                    p.wait(timeout=rng.uniform(3.0, 12.0))
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                    kills += 1
                    continue
            if p.returncode == 0 and (run / "final_model").is_dir():
                break
        identical += _same_metrics(ref, run)
    return {"sigkills": kills, "chains": chains, "chains_identical_to_uninterrupted": identical}


def concurrent(root: Path, model: Path, pairs: int) -> dict:
    dup = refused = both_ok = 0
    for i in range(pairs):
        run = root / f"conc-{i}"
        logs = [open(root / f"conc-{i}-{j}.log", "w") for j in range(2)]
        ps = [_popen(train_args(model, run, steps=4), logs[j]) for j in range(2)]
        codes = [p.wait(timeout=300) for p in ps]
        for f in logs:
            f.close()
        steps = [m["step"] for m in step_lines(run)]
        dup += len(steps) - len(set(steps))
        refused += codes.count(1)
        both_ok += codes == [0, 0]
    # --resume RUN while RUN trains
    run = root / "conc-resume"
    with open(root / "conc-resume.log", "w") as log:
        p = _popen(train_args(model, run, "--log.save_steps", "1", steps=100000), log)
        while len(step_lines(run)) < 3:
            time.sleep(0.2)
        r = run_cli(["train", "--threads", "1", "--resume", str(run)])
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    steps = [m["step"] for m in step_lines(run)]
    return {
        "concurrent_start_pairs": pairs, "second_start_refused": refused, "both_exited_0": both_ok,
        "duplicated_metric_rows": dup + len(steps) - len(set(steps)),
        "resume_while_training_refused": int(r.returncode == 1 and "in use" in r.stderr),
    }


def wrong_resumes(root: Path, model: Path, rew: str) -> dict:
    base = root / "wr-base"
    run_cli(train_args(model, base, "--algo", "rloo", steps=3, reward=rew))
    cases = {}

    def fresh(name):
        d = root / f"wr-{name}"
        shutil.copytree(base, d)
        return d

    (root / "wr-empty").mkdir()
    (root / "wr-unrelated").mkdir()
    (root / "wr-unrelated" / "metrics.jsonl").write_text('{"keep": 1}\n')
    cases["missing dir"] = ["--resume", str(root / "nosuch")]
    cases["typo"] = ["--resume", str(base) + "x"]
    cases["empty dir"] = ["--resume", str(root / "wr-empty")]
    cases["unrelated dir"] = ["--resume", str(root / "wr-unrelated")]
    cases["/tmp"] = ["--resume", "/tmp"]
    cases["--algo spo_tree on rloo"] = ["--resume", str(fresh("algo")), "--algo", "spo_tree"]
    cases["--lora.r 4"] = ["--resume", str(fresh("lora")), "--lora.r", "4"]
    cases["--train.seed 1"] = ["--resume", str(fresh("seed")), "--train.seed", "1"]
    d = fresh("metrics")
    (d / "metrics.jsonl").unlink()
    cases["metrics.jsonl deleted"] = ["--resume", str(d)]
    out = {"wrong_resumes": len(cases), "refused_one_line": 0, "tracebacks": 0}
    for args in cases.values():
        r = run_cli(["train", "--threads", "1", *args])
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        out["tracebacks"] += "Traceback" in r.stderr + r.stdout
        out["refused_one_line"] += r.returncode == 1 and len(lines) == 1 and lines[0].startswith("segrl: ")
    d = fresh("config")
    (d / "config.yaml").unlink()
    r = run_cli(["train", "--threads", "1", "--resume", str(d), "--train.max_steps", "4"])
    rows = step_lines(d)
    out["config.yaml deleted: resumed with the run's settings"] = int(r.returncode == 0 and rows[-1]["train/samples"] == 8.0)
    assert (root / "wr-unrelated" / "metrics.jsonl").read_text() == '{"keep": 1}\n'
    return out


def _recompute_manifest(ck: Path) -> None:
    mf = json.loads((ck / "manifest.json").read_text())
    for rel in mf["files"]:
        data = (ck / rel).read_bytes()
        mf["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (ck / "manifest.json").write_text(json.dumps(mf))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/segrl-audit-pwned",))


def corrupt_checkpoints(root: Path, model: Path, rew: str) -> dict:
    import pickle

    base = root / "cc-base"
    run_cli(train_args(model, base, steps=3, reward=rew))
    damages = {
        "flipped byte": lambda ck: _flip(ck / "optimizer.pt"),
        "no manifest": lambda ck: (ck / "manifest.json").unlink(),
        "state missing keys*": lambda ck: (ck / "trainer_state.json").write_text('{"step": 3}'),
        "state not JSON*": lambda ck: (ck / "trainer_state.json").write_text("{"),
        "garbage optimizer.pt*": lambda ck: (ck / "optimizer.pt").write_bytes(os.urandom(2048)),
        "truncated safetensors*": lambda ck: _cut(ck / "model" / "model.safetensors"),
        "pickle payload in optimizer.pt*": lambda ck: (ck / "optimizer.pt").write_bytes(pickle.dumps({"x": _Payload()}, protocol=2)),
    }
    out = {"corrupt_checkpoints": len(damages), "fell_back_exactly": 0, "tracebacks": 0}
    for i, (name, damage) in enumerate(damages.items()):
        d = root / f"cc-{i}"
        shutil.copytree(base, d)
        ck = d / "checkpoints" / "step-000003"
        damage(ck)
        if name.endswith("*"):
            _recompute_manifest(ck)
        shutil.rmtree(d / "final_model")
        r = run_cli(["train", "--threads", "1", "--resume", str(d)])
        out["tracebacks"] += "Traceback" in r.stdout + r.stderr
        ok = r.returncode == 0 and r.stdout.count("skipping corrupt checkpoint") == 1 and _same_metrics(base, d)
        out["fell_back_exactly"] += ok
    out["payload executed"] = int(os.path.exists("/tmp/segrl-audit-pwned"))
    return out


def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _cut(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def disk_full(root: Path, model: Path, rew: str) -> dict:
    mnt = root / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        return {"disk_full": "skipped (no mount)"}
    try:
        ref, run = root / "df-ref", mnt / "run"
        run_cli(train_args(model, ref, "--eval.eval_before", "false", steps=6, reward=rew))
        with open(mnt / "filler", "wb") as f:
            f.write(b"\0" * (shutil.disk_usage(mnt).free - 400_000))
        r1 = run_cli(train_args(model, run, "--eval.eval_before", "false", "--log.report_to", "tensorboard", steps=6, reward=rew))
        partial = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")] if (run / "checkpoints").is_dir() else []
        r2 = run_cli(["train", "--threads", "1", "--resume", str(run)])
        (mnt / "filler").unlink()
        r3 = run_cli(["train", "--threads", "1", "--resume", str(run)])
        one = lambda r: r.returncode == 1 and "no space left on" in r.stderr and len(r.stderr.strip().splitlines()) == 1  # noqa: E731
        return {
            "disk_full_one_line": int(one(r1)), "partial_left": len(partial), "resume_before_free_one_line": int(one(r2)),
            "resume_after_free_exact": int(r3.returncode == 0 and _same_metrics(ref, run)), "message": r1.stderr.strip(),
        }
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chains", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=["kills", "concurrent", "resumes", "corrupt", "disk"], help="parts to run")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="segrl-audit-"))
    model = tiny_model_dir(root)
    rew = f"{reward_file(root)}:length_reward"
    rng = random.Random(a.seed)
    parts = {
        "kills": lambda: kill_chains(root, model, rew, a.chains, rng),
        "concurrent": lambda: concurrent(root, model, a.pairs),
        "resumes": lambda: wrong_resumes(root, model, rew),
        "corrupt": lambda: corrupt_checkpoints(root, model, rew),
        "disk": lambda: disk_full(root, model, rew),
    }
    for name in a.only:
        print(json.dumps(parts[name]()), flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
