"""``python -m pipelines.training train|evaluate|phantoms write ...``"""

from pipelines.training.cli import app

app(prog_name="python -m pipelines.training")
