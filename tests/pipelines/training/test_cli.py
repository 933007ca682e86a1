"""``pacs-node train`` / ``evaluate`` as the node's CLI mounts them: options anywhere, errors named."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from pacs_node.cli.training import evaluate_app, phantoms_app, train_app


def _cli() -> typer.Typer:
    root = typer.Typer()
    root.callback()(lambda: None)
    root.add_typer(train_app, name="train")
    root.add_typer(evaluate_app, name="evaluate")
    root.add_typer(phantoms_app, name="phantoms")
    return root


def test_evaluate_takes_options_after_its_arguments_and_names_a_missing_bundle(tmp_path):
    result = CliRunner().invoke(_cli(), ["evaluate", str(tmp_path / "nope"), "phantoms:seed=0,count=1",
                                         "--out", str(tmp_path / "eval"), "--no-meteor"])
    assert result.exit_code == 2, result.output
    assert "bundle directory not found" in result.output and str(tmp_path / "nope") in result.output


def test_train_rejects_unknown_stage_and_bad_step_spec(tmp_path):
    runner = CliRunner()
    bad_stage = runner.invoke(_cli(), ["train", "--out", str(tmp_path), "--stages", "detector,bogus"])
    assert bad_stage.exit_code == 2 and "bogus" in bad_stage.output
    bad_steps = runner.invoke(_cli(), ["train", "--out", str(tmp_path), "--steps", "detector=many"])
    assert bad_steps.exit_code == 2 and "detector=many" in bad_steps.output
