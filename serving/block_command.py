"""`runbooks block`: save the project's blocks to the running Prefect server, list saved blocks.

`Block.save()` in a Python shell without PREFECT_API_URL saves to a temporary server Prefect
starts for that one process, and the block silently vanishes with it. This command saves to the
server `runbooks up` serves (or --api-url / PREFECT_API_URL), refuses to run when nothing
answers there, validates the fields with the block's own pydantic model first, and reads
secrets only from a prompt without echo or from standard input, never from the command line
(shell history, `ps`); nothing it prints holds a secret.

    runbooks block save postgres-database default --host db --user runbooks --password-stdin
    runbooks block list
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import SecretStr, ValidationError

# where `runbooks up` serves its API unless told otherwise (its --host and --port defaults)
DEFAULT_API_URL = "http://127.0.0.1:4200/api"
# every request of this command; a save is a few small requests
REQUEST_TIMEOUT_S = 30.0

FieldKind = Literal["value", "list", "block", "secret"]


@dataclass(frozen=True)
class FieldOption:
    """How one block field is given on the command line."""

    field: str
    kind: FieldKind
    block_class: type | None = None
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        name = self.field.replace("_", "-")
        return f"--{name}-stdin" if self.kind == "secret" else f"--{name}"


def api_url(flag: str | None, environ: Mapping[str, str]) -> str:
    """The Prefect API to talk to: --api-url, else PREFECT_API_URL, else `runbooks up`'s."""
    return flag or environ.get("PREFECT_API_URL") or DEFAULT_API_URL


def block_classes() -> dict[str, type]:
    """The project's block classes by command name: the slug without `runbooks-`."""
    from prefect.blocks.core import Block

    import blocks

    classes = (getattr(blocks, name) for name in blocks.__all__)
    return {
        cls.get_block_type_slug().removeprefix("runbooks-"): cls
        for cls in classes
        if isinstance(cls, type) and issubclass(cls, Block)
    }


def field_options(cls: type) -> list[FieldOption]:
    """One command-line option per field of a block class."""
    return [_field_option(name, field.annotation) for name, field in cls.model_fields.items()]


def _field_option(name: str, annotation: Any) -> FieldOption:
    from prefect.blocks.core import Block

    # `X | None` and `Optional[X]`: the option is about X
    if get_origin(annotation) in (Union, types.UnionType):
        inner = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(inner) == 1:
            annotation = inner[0]
    if annotation is SecretStr:
        return FieldOption(name, "secret")
    if get_origin(annotation) is list:
        return FieldOption(name, "list")
    if isinstance(annotation, type) and issubclass(annotation, Block):
        return FieldOption(name, "block", annotation)
    if get_origin(annotation) is Literal:
        return FieldOption(name, "value", choices=tuple(str(arg) for arg in get_args(annotation)))
    if annotation is bool:
        return FieldOption(name, "value", choices=("true", "false"))
    return FieldOption(name, "value")


HELP = "save a block to the running Prefect server, list blocks"


def main(argv: list[str]) -> int:
    """`runbooks block ...`; its parser is built only here, because building it imports every
    block module (Prefect, the Kafka and Kubernetes clients), which other commands do not need."""
    return run(parser().parse_args(argv))


def parser() -> argparse.ArgumentParser:
    """`runbooks block save <type> <name> [--field value ...]` and `runbooks block list`."""
    block = argparse.ArgumentParser(prog="runbooks block", description=HELP)
    commands = block.add_subparsers(dest="block_command", required=True)
    save = commands.add_parser(
        "save",
        help="validate a block's fields and save it",
        description="Validate a block's fields with its model and save it to the Prefect server "
        f"(--api-url, else PREFECT_API_URL, else {DEFAULT_API_URL}, where `runbooks up` "
        "serves). Secrets come from a prompt without echo (on a terminal) or standard input.",
    )
    block_types = save.add_subparsers(dest="block_type", required=True, metavar="TYPE")
    for name, cls in sorted(block_classes().items()):
        type_parser = block_types.add_parser(
            name,
            aliases=[cls.get_block_type_slug()],
            help=cls.get_description(),
            description=f"Save a '{cls.get_block_type_name()}' block: {cls.get_description()}",
        )
        type_parser.add_argument("name", help="name of the block, e.g. 'default'")
        _add_common(type_parser)
        type_parser.add_argument(
            "--overwrite", action="store_true", help="replace a saved block of this name"
        )
        for option in field_options(cls):
            _add_field_argument(type_parser, cls, option)
        type_parser.set_defaults(block_class=cls)
    listing = commands.add_parser("list", help="list the blocks saved on the Prefect server")
    _add_common(listing)
    return block


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-url",
        default=None,
        help=f"Prefect API (default: PREFECT_API_URL, else {DEFAULT_API_URL})",
    )


def _add_field_argument(parser: argparse.ArgumentParser, cls: type, option: FieldOption) -> None:
    field = cls.model_fields[option.field]
    if field.is_required():
        text = f"{field.description} (required)"
    elif field.default is None or option.kind == "secret":
        text = field.description
    else:
        text = f"{field.description} (default: {field.get_default(call_default_factory=True)})"
    if option.kind == "secret":
        parser.add_argument(
            option.flag,
            dest=option.field,
            action="store_true",
            help=f"{text} Secret: prompted without echo on a terminal, else read from stdin.",
        )
    elif option.kind == "list":
        parser.add_argument(
            option.flag, dest=option.field, action="append", help=f"{text} Repeat for more."
        )
    elif option.kind == "block":
        assert option.block_class is not None
        parser.add_argument(
            option.flag,
            dest=option.field,
            metavar="BLOCK_NAME",
            help=f"{text} Name of a saved '{option.block_class.get_block_type_slug()}' block.",
        )
    else:
        parser.add_argument(option.flag, dest=option.field, choices=option.choices, help=text)


def run(args: argparse.Namespace) -> int:
    from prefect.settings import (
        PREFECT_API_REQUEST_TIMEOUT,
        PREFECT_API_URL,
        temporary_settings,
    )

    url = api_url(args.api_url, os.environ)
    # set here, not only in the environment: Prefect may have read its settings at import
    with temporary_settings({PREFECT_API_URL: url, PREFECT_API_REQUEST_TIMEOUT: REQUEST_TIMEOUT_S}):
        try:
            _check_server(url)
            if args.block_command == "list":
                return _list_blocks()
            return _save_block(args, url)
        except CommandError as error:
            print(f"runbooks block: {error}", file=sys.stderr)
            return 1


class CommandError(Exception):
    """A problem to tell the user in one line (never holding a secret)."""


def _check_server(url: str) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise CommandError(
            f"no Prefect server answers at {url} ({type(problem).__name__}): start it with "
            "`make up` (or `runbooks up`), or name it with --api-url or PREFECT_API_URL"
        )


def _save_block(args: argparse.Namespace, url: str) -> int:
    cls = args.block_class
    options = field_options(cls)
    data = _field_values(args, options)
    try:
        block = cls.model_validate(data)
    except ValidationError as error:
        raise CommandError(_describe_errors(cls, error)) from None
    slug = cls.get_block_type_slug()
    if not args.overwrite and _block_exists(slug, args.name):
        raise CommandError(f"{slug}/{args.name} exists; pass --overwrite to replace it")
    block.save(args.name, overwrite=args.overwrite)
    given = [
        f"{option.field} (secret)" if option.kind == "secret" else option.field
        for option in options
        if option.field in data
    ]
    print(f"saved {slug}/{args.name} to {url}: {', '.join(given) or 'all defaults'}")
    return 0


def _field_values(args: argparse.Namespace, options: list[FieldOption]) -> dict[str, Any]:
    """The fields given on the command line; secrets prompted for or read from stdin."""
    secrets = [o for o in options if o.kind == "secret" and getattr(args, o.field)]
    piped = not sys.stdin.isatty()
    if piped and len(secrets) > 1:
        raise CommandError(
            "standard input holds one secret: give one of "
            f"{', '.join(o.flag for o in secrets)} per command, or run it in a terminal to be "
            "prompted for each"
        )
    data: dict[str, Any] = {}
    for option in options:
        value = getattr(args, option.field)
        if option.kind == "secret":
            if value:
                data[option.field] = _read_secret(option.field, piped)
        elif value is not None:
            data[option.field] = (
                _load_block(option.block_class, value) if option.kind == "block" else value
            )
    return data


def _read_secret(field: str, piped: bool) -> str:
    if piped:
        # a trailing newline is what `echo` and files add, never part of the secret
        secret = sys.stdin.read().rstrip("\r\n")
    else:
        secret = getpass.getpass(f"{field}: ")
    if not secret:
        raise CommandError(f"{field}: empty (nothing on standard input or at the prompt)")
    return secret


def _load_block(cls: type | None, name: str) -> Any:
    from prefect.exceptions import ObjectNotFound

    assert cls is not None
    try:
        return cls.load(name)
    except (ObjectNotFound, ValueError):
        raise CommandError(
            f"no saved {cls.get_block_type_slug()} block named {name!r}: save it first "
            f"(runbooks block save {cls.get_block_type_slug().removeprefix('runbooks-')} {name} ...)"
        ) from None


def _block_exists(slug: str, name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_block_document_by_name(name, slug, include_secrets=False)
        except ObjectNotFound:
            return False
    return True


def _describe_errors(cls: type, error: ValidationError) -> str:
    """Pydantic's errors as `field: message` lines, without the input (it may hold secrets)."""
    lines = [f"{cls.get_block_type_name()} is not valid:"]
    for item in error.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "block"
        missing = item["type"] == "missing" and len(item["loc"]) == 1
        flag = f" (--{where.replace('_', '-')})" if missing else ""
        lines.append(f"  {where}{flag}: {item['msg']}")
    return "\n".join(lines)


def _list_blocks() -> int:
    from prefect.client.orchestration import get_client

    page = 200
    rows: list[tuple[str, str]] = []
    with get_client(sync_client=True) as client:
        while True:
            # Prefect 3.8.8's read_block_documents sends a null limit; the endpoint pages itself
            response = client.request(
                "POST",
                "/block_documents/filter",
                json={
                    "include_secrets": False,
                    "sort": "NAME_ASC",
                    "limit": page,
                    "offset": len(rows),
                    "block_documents": {"is_anonymous": {"eq_": False}},
                },
            )
            documents = response.json()
            rows += [(d["block_type"]["slug"], d["name"]) for d in documents]
            if len(documents) < page:
                break
    for slug, name in sorted(rows):
        print(f"{slug}/{name}")
    if not rows:
        print("no blocks saved (runbooks block save --help)", file=sys.stderr)
    return 0
