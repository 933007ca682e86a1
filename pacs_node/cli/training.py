"""``pacs-node train``, ``pacs-node evaluate`` and ``pacs-node phantoms write``.

Added by ``pacs_node/cli/main.py`` with ``app.add_typer(<obj>, name=...)``:

* ``train_app``    - ``pacs-node train --out RUN [--data ...] [--steps ...] [--export BUNDLE]``
* ``evaluate_app`` - ``pacs-node evaluate BUNDLE DATASET [--out DIR]``
* ``phantoms_app`` - ``pacs-node phantoms write --count N --out DIR [--size 2500]``

The commands themselves live in :mod:`pipelines.training.cli` (also ``python -m pipelines.training``), so
both entry points take identical options. ``train`` and ``evaluate`` are single commands: their functions
are the callbacks of their sub-apps, invoked without a sub-command name. Importing this module imports
typer only; torch loads when a command runs.
"""

from __future__ import annotations

import typer

from pipelines.training import cli as _commands

train_app = typer.Typer(help="Train or resume a CRRG-CLIP model and export a bundle.")
train_app.callback(invoke_without_command=True)(_commands.train)

# a typer sub-app is a click group, and groups stop reading options at the first argument unless told
# otherwise: without this ``pacs-node evaluate BUNDLE DATASET --out DIR`` would refuse ``--out``
evaluate_app = typer.Typer(help="Score a bundle on phantoms or a MIMIC-CXR + Chest ImaGenome tree.",
                           context_settings={"allow_interspersed_args": True})
evaluate_app.callback(invoke_without_command=True)(_commands.evaluate)

phantoms_app = _commands.phantoms_app

__all__ = ["evaluate_app", "phantoms_app", "train_app"]
