"""The ``intes`` command line: click commands that parse arguments and call the Python API.

Errors a user can cause (``IntesError``, and OS errors such as a full disk) become one line,
``error: <message>``, and exit status 1; click's usage errors exit 2; Ctrl-C exits 130. No
user error ever prints a traceback.

``bench`` and ``finetune`` are loaded on first use: their heavy imports (numba compilation,
torch) stay out of every other command, and if one cannot be imported (a missing optional
dependency) it reports that in one line while the other commands keep working.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import sys

import click

from intes import distributed
from intes.cli.data import data
from intes.cli.evaluate import evaluate, info, sample
from intes.cli.pretrain import pretrain
from intes.errors import INTERRUPTED, Interrupted, IntesError
from intes.runs import intes_version

LAZY_COMMANDS = {"bench": "intes.cli.bench", "finetune": "intes.cli.finetune"}
DISTRIBUTED_COMMANDS = ("pretrain", "finetune")  # the others would run once per worker


class UserError(click.ClickException):
    """An error the user can fix, shown as one ``error:`` line with exit status 1."""

    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", file=file, err=file is None)


def _unavailable(name: str, err: ImportError) -> click.Command:
    """Stand-in for a command whose module exists but cannot be imported here."""

    def fail(args: tuple[str, ...]) -> None:
        raise UserError(f"intes {name} is unavailable: {err}")

    return click.Command(name, callback=fail, help=f"(unavailable: {err})",
                         context_settings={"ignore_unknown_options": True},
                         params=[click.Argument(["args"], nargs=-1)])


class IntesGroup(click.Group):
    """A group that turns user errors into one line and loads some commands lazily."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [name for name, module in LAZY_COMMANDS.items()
                if importlib.util.find_spec(module) is not None]
        return sorted([*super().list_commands(ctx), *lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = LAZY_COMMANDS.get(name)
        if module is None:
            return super().get_command(ctx, name)
        if importlib.util.find_spec(module) is None:
            return None
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError as err:
            return _unavailable(name, err)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if name not in DISTRIBUTED_COMMANDS and distributed.launched():
            raise UserError(f"intes {name} runs in one process: start it without torchrun "
                            f"(under torchrun: {', '.join(DISTRIBUTED_COMMANDS)})")
        return name, command, rest

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except IntesError as err:
            raise UserError(str(err)) from None
        except Interrupted:  # already reported; as Abort, click would print more
            raise click.exceptions.Exit(INTERRUPTED) from None
        except OSError as err:
            if isinstance(err, BrokenPipeError):
                raise
            raise UserError(describe_os_error(err)) from None


def describe_os_error(err: OSError) -> str:
    """An OS error as one line that names the path and says what is wrong with it."""
    if err.filename is None:
        return err.strerror or str(err)
    if err.errno == errno.ENOTDIR:
        return f"cannot use {err.filename}: a part of that path is a file, not a directory"
    if err.errno == errno.EEXIST:
        return f"cannot create the directory {err.filename}: a file of that name exists"
    return f"{err.filename}: {err.strerror}"


@click.group(cls=IntesGroup, context_settings={"help_option_names": ["-h", "--help"],
                                               "max_content_width": 100})
@click.version_option(intes_version(), prog_name="intes", message="%(prog)s %(version)s")
def cli() -> None:
    """intes: pretrain int8 recurrent language models with integer evolution strategies."""


cli.add_command(pretrain)
cli.add_command(evaluate)
cli.add_command(sample)
cli.add_command(info)
cli.add_command(data)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run ``cli`` and map its outcome to an exit status."""
    if hasattr(sys.stdout, "reconfigure"):  # a character the terminal cannot show is a "?",
        sys.stdout.reconfigure(errors="replace")  # not a UnicodeEncodeError ending the run
    try:
        result = cli.main(args=argv, prog_name="intes", standalone_mode=False)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(INTERRUPTED)
    sys.exit(result if isinstance(result, int) else 0)
