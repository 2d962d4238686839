"""A local web page for the whole pipeline: data, transcripts, training, listening, choosing, speaking. Run with --help.

The page starts the same scripts the command line runs (prepare_dataset.py, finetune_tts.py, cli_tts.py) as
jobs that outlive the page; see fs_pipeline/webui/.
"""

import os
from pathlib import Path

import click

from fs_pipeline import PipelineError
from fs_pipeline.cli import setup_logging, user_errors
from fs_pipeline.versions import DEFAULT_MODEL_VERSION, MODEL_VERSIONS

DEFAULT_BASE_MODEL = Path("checkpoints/openaudio-s1-mini")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Any address but the loopback one needs --auth: the page can run code-heavy jobs and read your files.")
@click.option("--port", default=7860, show_default=True)
@click.option("--pretrained-ckpt-path", type=click.Path(path_type=Path), default=DEFAULT_BASE_MODEL, show_default=True,
              help="Base model directory that training and merging start from.")
@click.option("--model-version", type=click.Choice(sorted(MODEL_VERSIONS)), default=DEFAULT_MODEL_VERSION, show_default=True)
@click.option("--auth", metavar="USER:PASSWORD", help="HTTP basic authentication for every request; required off 127.0.0.1.")
@click.option("--device", default=None, help="cuda, mps or cpu for the jobs the page starts [default: the automatic choice].")
@user_errors
def main(host, port, pretrained_ckpt_path, model_version, auth, device) -> None:
    """Serve the fs-pipeline page: projects, uploads, preparation, transcripts, training, checkpoints, merging and speech.

    \b
      python webui.py                      # then open http://127.0.0.1:7860
      python webui.py --pretrained-ckpt-path checkpoints/openaudio-s1-mini --port 8000
      python webui.py --host 0.0.0.0 --auth alice:long-secret   # reachable from other machines
    """
    import uvicorn

    from fs_pipeline.webui.app import WebSettings, create_app, is_loopback

    setup_logging()
    credentials = parse_auth(auth)
    if not is_loopback(host):
        if credentials is None:
            raise PipelineError(f"--host {host} makes the page reachable from other machines: add --auth USER:PASSWORD, "
                                "or keep the default --host 127.0.0.1")
        click.secho(f"warning: listening on {host}: anyone who can reach this machine and knows the password can run jobs "
                    "and read the projects' files; basic authentication is sent in clear text without TLS", fg="yellow", err=True)
    if not pretrained_ckpt_path.is_dir():
        click.secho(f"note: base model {pretrained_ckpt_path} not found: training and merging will say so until it is there "
                    "(--pretrained-ckpt-path DIR)", fg="yellow", err=True)
    settings = WebSettings(base_model=pretrained_ckpt_path.resolve(), model_version=model_version, device=device, auth=credentials)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"fs-pipeline page: http://{shown}:{port}/  (projects in {os.path.abspath('results')}; Ctrl+C stops the page, "
               "not the jobs it started)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise PipelineError("--auth must be USER:PASSWORD, both non-empty")
    return user, password


if __name__ == "__main__":
    main()
