"""``bench/pipeline.py`` at tiny size on the CPU, so that it cannot rot. No timing is asserted."""

from __future__ import annotations

import json

from bench.pipeline import main


def test_bench_pipeline_runs_on_cpu_and_reports_equivalence(tmp_path, capsys):
    out = tmp_path / "result.json"
    result = main(["--device", "cpu", "--preset", "tiny", "--images", "4", "--batch", "2,4", "--engine-images", "2",
                   "--engine-batch", "2", "--regions", "3", "--tokens", "3", "--repeats", "1", "--check-images", "2",
                   "--count-flops", "--profile", "--reference", "none", "--out", str(out)])
    first = capsys.readouterr().out.splitlines()[0]
    assert json.loads(first) == json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["fast"]["images_per_s"] > 0 and result["engine"]["images_per_s"] > 0
    assert set(result["fast_images_per_s_by_batch"]) == {"2", "4"}
    assert result["equivalence"]["float32"]["sequences_identical"] == 1.0
    assert result["equivalence"]["float32"]["boxes_within_1px"] == 1.0
    assert "decoder" in result["gflop_per_image"]["fast"]
    assert {"detector", "decoder", "clip"} <= set(result["profile"])
    assert all(row["ms"] >= 0 and row["calls"] > 0 for row in result["profile"]["decoder"])
