"""benchmarks/bench_fused_linear.py and the GPU check's fused_linear rows and targets (CPU, tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench_fused_linear, fused_linear_targets
from benchmarks.gpu_check import ROW_FIELDS, _type_ok


def test_the_benchmark_writes_its_rows_and_checks_values(tmp_path: Path) -> None:
    out = tmp_path / "fl.json"
    argv = ["--device", "cpu", "--sizes", "tiny", "--impls", "fused,naive", "--reps", "2", "--warmup", "0"]
    assert bench_fused_linear.main([*argv, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["device_type"] == "cpu"
    assert [r["impl"] for r in doc["rows"]] == ["fused", "naive"]
    for r in doc["rows"]:
        assert r["case"] == "tiny-float32"
        assert len(r["times_s"]) == 2
        assert r["median_s"] > 0
        assert r["peak_bytes"] > 0
    fused, naive = doc["rows"]
    assert abs(fused["value"] - naive["value"]) < 1e-4 * max(1.0, abs(naive["value"]))
    assert (tmp_path / "fl.md").read_text().count("| tiny-float32 |") == 2


def test_cpu_peak_counts_what_the_allocator_holds() -> None:
    """The probe sees a 4 MiB temporary that is freed before the call returns, and nothing more."""

    def work() -> Any:
        a = torch.empty(1 << 20)  # 4 MiB, freed inside
        b = torch.empty(1 << 18)  # 1 MiB, returned (the probe frees the output after the call)
        del a
        return b

    peak = bench_fused_linear.cpu_peak_bytes(work)
    assert 5 << 20 <= peak < (5 << 20) + 4096


def _row(device: str, case: str, impl: str, median: float | None, peak: int | None, note: str = "") -> dict[str, Any]:
    return {
        "device": device,
        "case": case,
        "shape": "s",
        "impl": impl,
        "median_s": median,
        "peak_bytes": peak,
        "note": note,
    }


def test_targets_met_missed_and_not_measured() -> None:
    gpu, cpu = fused_linear_targets.GPU_CASE, fused_linear_targets.CPU_CASE
    rows = [
        _row("cuda", gpu, "fused", 0.070, 3_000),
        _row("cuda", gpu, "liger", 0.100, 3_500),
        _row("cuda", gpu, "liger_ops", 0.080, 9_000),
        _row("cpu", cpu, "fused", 14.0, 300),
        _row("cpu", cpu, "naive", 16.0, 2_500),
    ]
    got = {t["target"]: t for t in fused_linear_targets.targets(rows)}
    assert len(got) == 4
    by = {k.split(": ", 1)[1]: v for k, v in got.items()}
    assert by["peak extra <= Liger-Kernel's"]["passed"] is True  # 3,000 <= min(3,500, 9,000)
    assert by["time <= 0.8x Liger-Kernel's"]["passed"] is False  # 0.070 / 0.080 = 0.875 (the faster Liger)
    assert "0.88x of liger_ops" in by["time <= 0.8x Liger-Kernel's"]["value"]
    assert by["peak <= 1/8 of naive"]["passed"] is True  # 2,500 / 300 = 8.3
    assert by["time <= naive"]["passed"] is True
    rows[4]["peak_bytes"] = 2_000  # 1/6.7: missed
    got = {t["target"].split(": ", 1)[1]: t for t in fused_linear_targets.targets(rows)}
    assert got["peak <= 1/8 of naive"]["passed"] is False
    # Liger not installed: recorded as a skipped row; its targets are not measured, never invented
    skipped = [_row("cuda", gpu, "fused", 0.07, 3_000), _row("cuda", "all sizes", "liger", None, None, "no liger")]
    got = {t["target"].split(": ", 1)[1]: t for t in fused_linear_targets.targets(skipped)}
    assert got["peak extra <= Liger-Kernel's"]["passed"] is None
    assert got["peak extra <= Liger-Kernel's"]["value"] == "Liger-Kernel not measured"
    assert got["peak <= 1/8 of naive"]["passed"] is None


def test_rows_read_both_files_and_match_the_manifest_schema(tmp_path: Path) -> None:
    def doc(device: str, impls: list[str], skipped: list[dict[str, str]]) -> dict[str, Any]:
        rows = [{"case": "c", "shape": "1x2x3", "impl": i, "median_s": 0.5, "peak_bytes": 10} for i in impls]
        return {"meta": {"device_type": device}, "rows": rows, "skipped": skipped}

    (tmp_path / "fused_linear.json").write_text(
        json.dumps(doc("cuda", ["fused", "naive"], [{"impl": "liger", "reason": "liger_kernel not importable"}]))
    )
    (tmp_path / "fused_linear_cpu.json").write_text(json.dumps(doc("cpu", ["fused"], [])))
    rows = fused_linear_targets.rows(tmp_path)
    assert [(r["device"], r["impl"]) for r in rows] == [
        ("cuda", "fused"),
        ("cuda", "naive"),
        ("cuda", "liger"),
        ("cpu", "fused"),
    ]
    assert rows[2]["median_s"] is None
    assert rows[2]["note"] == "liger_kernel not importable"
    for r in rows:
        for key, types in ROW_FIELDS["fused_linear"].items():
            assert _type_ok(r[key], types), (key, r[key])
    table = "\n".join(fused_linear_targets.markdown(rows))
    assert "| cuda | all sizes | - | liger | not measured: liger_kernel not importable | | | |" in table
    assert "| cuda | c | 1x2x3 | naive | 500.0 ms | 0 MiB | 1.00x | 1/1.0 |" in table
    assert fused_linear_targets.rows(tmp_path / "missing") == []
