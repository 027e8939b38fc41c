"""mkdocs hook (mkdocs.yml `hooks:`): the troubleshooting page's list of every error a user can
meet, read from the source at build time so that it cannot drift from the code.

Each `raise` of an error the `mae` command prints as one `error:` line (or argparse's usage
error), and of the ops' argument errors, is listed with its message; an f-string's fields appear
as `{expression}`. The page holds `<!-- error-lines -->` where the list goes.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- error-lines -->"
# what `mae` turns into one `error:` line (mae/cli.py main) or argparse's usage error, and the ops'
# argument errors
ERRORS = {"UsageError", "ValueError", "TypeError", "FileNotFoundError", "CheckpointError",
          "NonFiniteLossError", "ArgumentTypeError", "ShardError", "DataError"}


def _message(node: ast.expr) -> str | None:
    """The message of a string or f-string, its fields as `{expression}`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant)
                       else "{" + ast.unparse(part.value) + "}" for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _message(node.left), _message(node.right)
        return left + right if left is not None and right is not None else None
    return None


def error_lines(package: str) -> dict[str, list[str]]:
    """module -> the messages its raises carry, in source order, each once."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                    and node.exc.args):
                continue
            func = node.exc.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            message = _message(node.exc.args[0]) if name in ERRORS else None
            if message:
                lines = found.setdefault(str(path.relative_to(ROOT)), [])
                if message not in lines:
                    lines.append(message)
    return found


def render() -> str:
    out = []
    for package in ("mae", "mae_kernels"):
        for module, messages in error_lines(package).items():
            out.append(f"\n**`{module}`**\n")
            out += [f"- `{' '.join(message.split())}`" for message in messages]
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
