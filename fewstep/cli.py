"""The ``fewstep`` command: local services for development, and the demo."""

from __future__ import annotations

import functools
import os
import shlex

import click

from fewstep import console, services


def default_dir() -> str:
    """Where ``services start`` keeps its state unless ``--dir`` says: one place per user, so
    ``services env`` and ``stop`` find it from any directory (``FEWSTEP_SERVICES_DIR`` overrides)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "fewstep", "services")


@click.group()
@click.version_option(package_name="fewstep")
def cli() -> None:
    """Development helpers: local Redis + SeaweedFS, and the end-to-end demo."""


@cli.group("services")
def services_group() -> None:
    """Start, stop and locate a local Redis + SeaweedFS (127.0.0.1, with credentials)."""


DIR = click.option(
    "--dir",
    "directory",
    default=default_dir,
    envvar="FEWSTEP_SERVICES_DIR",
    show_default="~/.local/state/fewstep/services",
    help="Data and state directory (env FEWSTEP_SERVICES_DIR).",
)


def _exports(svc: services.Services) -> str:
    env = svc.env()
    if svc.buckets:  # what --output defaults to: jobs in the first bucket
        env["FEWSTEP_OUTPUT"] = f"s3://{svc.buckets[0]}/jobs"
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


@services_group.command("start")
@DIR
@click.option(
    "--bucket", "buckets", multiple=True, default=["fewstep"], show_default=True, help="Bucket(s) to create."
)
def services_start(directory: str, buckets: tuple[str, ...]) -> None:
    """Start both services and print the environment that points at them."""
    running = services.running(directory)
    if running is None:
        running = services.start(directory, list(buckets))
        click.echo(
            f"# started Redis on 127.0.0.1:{running.redis_port}, S3 on {running.s3_endpoint}", err=True
        )
    else:
        click.echo("# already running", err=True)
    where = "" if directory == default_dir() else f" --dir {shlex.quote(os.path.abspath(directory))}"
    click.echo(f'# load with: eval "$(fewstep services env{where})"', err=True)
    click.echo(_exports(running))


@services_group.command("env")
@DIR
def services_env(directory: str) -> None:
    """Print ``export`` lines for the running services (for ``eval``)."""
    running = services.running(directory)
    if running is None:
        raise click.ClickException(
            f"no local services running from {directory}; run `fewstep services start`"
        )
    click.echo(_exports(running))


@services_group.command("stop")
@DIR
def services_stop(directory: str) -> None:
    """Stop both services (their data stays in the directory)."""
    try:
        recorded = services.Services.load(directory)
    except Exception:
        click.echo(f"nothing to stop in {directory}")
        return
    recorded.stop()
    click.echo("stopped")


@cli.command("demo")
@click.option("--prompts", default=None, help="PartiPrompts-format TSV (default: examples/parti-sample.tsv).")
@click.option("--out", "out_dir", default="demo-output", show_default=True, help="Local copy of the results.")
def demo(prompts: str | None, out_dir: str) -> None:
    """Run a whole job end to end on local services with the tiny model."""
    from fewstep.demo import run_demo

    run_demo(prompts, out_dir)


main = functools.partial(console.run, cli)
