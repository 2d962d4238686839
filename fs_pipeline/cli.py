"""What the three top-level scripts share: logging set-up and turning PipelineError into one red line."""

import functools
import sys

import click
from loguru import logger

from fs_pipeline import PipelineError


def setup_logging(verbose: bool = False) -> None:
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if verbose else "INFO", format="<level>{level: <7}</level> {message}")


def user_errors(fn):
    """Run a click command body; a PipelineError becomes `error: ...` on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.secho("interrupted", fg="yellow", err=True)
            sys.exit(130)

    return wrapper


def device_options(fn):
    fn = click.option("--force-mps", is_flag=True, help="Use Apple MPS even though it falls back to CPU by default.")(fn)
    # A plain string, checked by select_device, so a wrong name gets our one-line error.
    fn = click.option("--device", default=None, help="cuda, mps or cpu; overrides the automatic choice (cuda > mps > cpu).")(fn)
    return fn


def model_summary(model_dir, llm, codec, choice) -> str:
    from fs_pipeline.models import count_parameters

    return "\n".join(
        [
            f"  device         {choice.device} ({choice.reason})",
            f"  precision      {choice.precision}",
            f"  model version  {model_dir.version.name} (weights licence: {model_dir.version.license})",
            f"  base model     {model_dir.path}",
            f"  LLM            {count_parameters(llm):,} parameters, {model_dir.num_codebooks} codebooks",
            f"  codec          {count_parameters(codec):,} parameters, {model_dir.version.sample_rate} Hz",
        ]
    )
