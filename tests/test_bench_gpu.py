"""The GPU benchmark script runs end to end on whatever device is here (a tiny model on CPU in CI)."""

from benchmarks.bench_gpu import main


def test_gpu_benchmark_script_reports_every_case_on_a_tiny_model():
    text = main(["--tiny"])
    rows = [line for line in text.splitlines() if line.startswith("| scratch") or line.startswith("| save_")]
    assert len(rows) == 3 and all(float(row.split("|")[2].replace(",", "")) > 0 for row in rows)
