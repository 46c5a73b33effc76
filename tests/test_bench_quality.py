"""bench/quality.py and bench/time_to_quality.py end to end on a tiny synthetic set: real train.py runs,
the tables and JSON they write, and what they compute from the runs (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str | Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_quality_tables_every_run_and_reuses_finished_ones(tmp_path):
    out = tmp_path / "quality"
    bench("quality.py", "--synthetic", "120", "--cache-dir", tmp_path / "data", "--out", out, "--models", "vae",
          "--recipes", "default,notebook", "--seeds", "0", "--epochs", "1", "--batch-size", "16")
    report = json.loads((out / "quality.json").read_text())
    runs = {r["recipe"]: r for r in report["runs"]}
    assert set(runs) == {"default", "notebook"} and all(r["status"] == "ok" for r in runs.values())
    for r in runs.values():
        summary = json.loads((Path(r["run"]) / "summary.json").read_text())
        assert r["psnr"] == summary["test"]["psnr"] and r["dead_fraction"] == summary["test"]["dead_fraction"]
        assert r["latent_dim"] == 80 and 0 <= r["active_units"] <= 80
        assert r["fid"] == summary["sample_quality"]["fid"] and r["fid_recon"] == summary["sample_quality"]["fid_recon"]
    assert [s["recipe"] for s in report["summary"]] == ["default", "notebook"]
    table = (out / "quality.md").read_text()
    assert "| vae | default | 0 |" in table and "| vae | notebook | 1/1 |" in table
    assert "| FID samples / recon | KID x1000 samples |" in table  # "–" here: tests have no Inception weights
    # a second call trains nothing: the finished runs are reused
    again = bench("quality.py", "--synthetic", "120", "--cache-dir", tmp_path / "data", "--out", out, "--models",
                  "vae", "--recipes", "default,notebook", "--seeds", "0", "--epochs", "1", "--batch-size", "16")
    assert again.stdout.count("done already") == 2

    # ...but never a finished run made otherwise: other train.py flags, or the recipe's defaults changed since
    def stale(*extra: str) -> str:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--synthetic", "120",
                               "--cache-dir", str(tmp_path / "data"), "--out", str(out), "--models", "vae",
                               "--recipes", "default", "--seeds", "0", "--epochs", "1", "--batch-size", "16", *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "done already" not in proc.stdout, proc.stdout + proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert str(out / "vae-default-seed0") in line and "delete it" in line
        return line

    assert "other train.py arguments" in stale("--", "--lr", "1e-3")
    summary_path = out / "vae-default-seed0" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["recipe"]["lr"] *= 2  # as if trained before the default's peak changed
    summary_path.write_text(json.dumps(summary))
    assert "an older version of its recipe" in stale()


def test_time_to_quality_races_until_the_target_and_reports_the_ratio(tmp_path):
    out = tmp_path / "ttq"
    bench("time_to_quality.py", "--synthetic", "120", "--cache-dir", tmp_path / "data", "--out", out,
          "--models", "ae", "--seeds", "0", "--seed-epochs", "2", "--batch-size", "16")
    report = json.loads((out / "time_to_quality.json").read_text())
    (row,) = report["runs"]
    seed = row["seed_run"]
    assert seed["epochs"] == 2 and row["target_psnr"] == seed["psnr"]
    assert json.loads((Path(seed["run"]) / "summary.json").read_text())["args"]["loader"] == "pil"
    tries = row["fast_tries"]
    assert [t["epochs"] for t in tries] == list(range(1, len(tries) + 1)) and len(tries) <= 2
    assert [Path(t["run"]).name for t in tries] == [f"fast-eager-fp32-e{t['epochs']}" for t in tries]
    assert all(t["psnr"] < row["target_psnr"] for t in tries[:-1])  # it stopped at the first run that reached it
    if row["fast_run"]:
        assert row["fast_run"] == tries[-1] and tries[-1]["psnr"] >= row["target_psnr"]
        assert row["speedup_wall"] == seed["wall_s"] / tries[-1]["wall_s"]
        assert report["median_speedup_wall"]["ae"] == row["speedup_wall"]
    else:
        assert "not reached in" in (out / "time_to_quality.md").read_text()
    assert report["machine"]["cores"] and "cache, eager, fp32, recipe default" == report["fast"]
