"""README.md and docs/*.md cannot drift from the code.

* ```schema blocks must equal the registered schemas (torch._C.parse_schema, then compared
  whole: names, types, defaults, returns), and every op must have one in the API reference.
* ```signature blocks (Python signatures) must equal inspect.signature of what they name.
* Every op call in a ```python block must bind to the op's schema (arity, keyword names, the
  arguments without default present, as many unpacked results as the op returns).
* Every op written as a signature in prose (an inline `combine(x, handle, weights, ...)`) must
  use the schema's argument names in order and its defaults; `-> (a, b)` after it must list
  the schema's return names.
* The handle columns listed in docs/contract.md must be those of deep_ep_ops/handle.py.
* ```python blocks whose first line is `# run: <command>` are run as written (torchrun runs as
  `python -m torch.distributed.run` of this interpreter), on CPU.
"""
from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import deep_ep_ops
from deep_ep_ops import handle as H
from deep_ep_ops.schemas import SCHEMAS

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
PUBLIC_OPS = [name for name in SCHEMAS if not name.startswith("_")]
OP_PREFIXES = ("torch.ops.deep_ep.", "deep_ep_ops.")


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(path: Path) -> list[Block]:
    text = path.read_text()
    return [Block(path, text[:m.start()].count("\n") + 1, m.group(1), m.group(2))
            for m in _FENCE.finditer(text)]


def _prose(path: Path) -> str:
    """The file with its fenced blocks blanked out (line numbers kept)."""
    return _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())


def _all_blocks(lang: str) -> list[Block]:
    return [b for path in DOCS for b in _blocks(path) if b.lang == lang]


def _schema(name: str):
    return getattr(torch.ops.deep_ep, name).default._schema


# -- schemas -------------------------------------------------------------------------------

def _schema_texts() -> list[tuple[str, str]]:
    out = []
    for block in _all_blocks("schema"):
        for chunk in re.split(r"\n\s*\n", block.text.strip()):
            out.append((block.where, " ".join(chunk.split())))
    return out


def test_schema_blocks_equal_the_registered_schemas() -> None:
    texts = _schema_texts()
    assert len(texts) >= 2 * len(PUBLIC_OPS), "expected schema blocks in contract.md and api.md"
    for where, text in texts:
        parsed = torch._C.parse_schema(text)
        namespace, _, name = parsed.name.partition("::")
        assert namespace == "deep_ep" and name in SCHEMAS, f"{where}: unknown op {parsed.name}"
        assert str(parsed) == str(_schema(name)), \
            f"{where}: documented\n  {parsed}\nregistered\n  {_schema(name)}"


def test_every_op_has_a_schema_in_api_and_contract() -> None:
    for doc, names in (("api.md", PUBLIC_OPS), ("contract.md", list(SCHEMAS))):
        documented = {torch._C.parse_schema(" ".join(c.split())).name.split("::")[1]
                      for b in _blocks(ROOT / "docs" / doc) if b.lang == "schema"
                      for c in re.split(r"\n\s*\n", b.text.strip())}
        assert documented == set(names), f"docs/{doc}: schemas of {sorted(documented)}, " \
            f"ops {sorted(names)}"


# -- Python signatures -----------------------------------------------------------------------

def _resolve(qualname: str):
    module_name, *attrs = qualname.split(".")
    obj = __import__(module_name)
    for i, attr in enumerate(attrs):
        if not hasattr(obj, attr):  # a submodule not imported by its package
            __import__(".".join([module_name] + attrs[:i + 1]))
        obj = getattr(obj, attr)
    return obj


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return eval(compile(ast.Expression(node), "<doc>", "eval"), {"torch": torch})


def test_signature_blocks_equal_the_python_signatures() -> None:
    blocks = _all_blocks("signature")
    assert blocks, "no signature blocks found"
    for block in blocks:
        m = re.fullmatch(r"([\w.]+)\((.*)\)", " ".join(block.text.split()))
        assert m, f"{block.where}: not a signature: {block.text!r}"
        target = _resolve(m.group(1))
        params = [p for p in inspect.signature(target).parameters.values()
                  if not (inspect.isfunction(target) and p.name == "self")]
        fn = ast.parse(f"def f({m.group(2)}): pass").body[0].args
        documented = []  # (name, kind, default)
        for arg, default in zip(fn.posonlyargs + fn.args,
                                [None] * (len(fn.posonlyargs + fn.args) - len(fn.defaults))
                                + fn.defaults):
            documented.append((arg.arg, "positional", default))
        if fn.vararg:
            documented.append((fn.vararg.arg, "*", None))
        for arg, default in zip(fn.kwonlyargs, fn.kw_defaults):
            documented.append((arg.arg, "keyword", default))
        kinds = {inspect.Parameter.POSITIONAL_ONLY: "positional",
                 inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
                 inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.KEYWORD_ONLY: "keyword"}
        actual = [(p.name, kinds[p.kind], p.default) for p in params]
        assert [d[:2] for d in documented] == [a[:2] for a in actual], \
            f"{block.where}: documented {[d[:2] for d in documented]}, code {[a[:2] for a in actual]}"
        for (name, _, doc_default), (_, _, default) in zip(documented, actual):
            if default is inspect.Parameter.empty:
                assert doc_default is None, f"{block.where}: {name} has no default in the code"
            else:
                assert doc_default is not None and _literal(doc_default) == default, \
                    f"{block.where}: {name} defaults to {default!r} in the code"


def test_buffer_argument_table_lists_every_argument() -> None:
    api = (ROOT / "docs" / "api.md").read_text()
    section = api.split("## Buffer", 1)[1].split("\n## ", 1)[0]
    table = section.split("| argument |", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert listed == list(inspect.signature(deep_ep_ops.Buffer).parameters)


# -- op calls in code and in prose ----------------------------------------------------------

def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


def _op_name(dotted: str | None, aliases: dict[str, str]) -> str | None:
    if dotted is None:
        return None
    head, _, rest = dotted.partition(".")
    if head in aliases:
        dotted = f"{aliases[head]}.{rest}"
    for prefix in OP_PREFIXES:
        if dotted.startswith(prefix) and dotted[len(prefix):] in PUBLIC_OPS:
            return dotted[len(prefix):]
    return None


def _check_binds(where: str, op: str, call: ast.Call) -> None:
    args = _schema(op).arguments
    names = [a.name for a in args]
    assert len(call.args) <= len(args), f"{where}: {op} takes {len(args)} arguments"
    given = set(names[:len(call.args)])
    for kw in call.keywords:
        assert kw.arg in names, f"{where}: {op} has no argument {kw.arg!r} (has {names})"
        assert kw.arg not in given, f"{where}: {op} gets {kw.arg!r} twice"
        given.add(kw.arg)
    missing = [a.name for a in args if a.name not in given and not a.has_default_value()]
    assert not missing, f"{where}: {op} needs {missing} (no default)"


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Names bound to ``torch.ops.deep_ep`` (``ops = torch.ops.deep_ep``, tuples included)."""
    out = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            pairs = [(target, node.value)]
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                pairs = list(zip(target.elts, node.value.elts))
            for t, v in pairs:
                if isinstance(t, ast.Name) and _dotted(v) == "torch.ops.deep_ep":
                    out[t.id] = "torch.ops.deep_ep"
    return out


def test_op_calls_in_python_blocks_bind_to_the_schemas() -> None:
    checked = 0
    for block in _all_blocks("python"):
        tree = ast.parse(block.text)
        aliases = _aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                op = _op_name(_dotted(node.func), aliases)
                if op:
                    _check_binds(block.where, op, node)
                    checked += 1
                elif _dotted(node.func) == "deep_ep_ops.Buffer":
                    try:
                        inspect.signature(deep_ep_ops.Buffer).bind(
                            *node.args, **{k.arg: k.value for k in node.keywords})
                    except TypeError as e:
                        raise AssertionError(f"{block.where}: Buffer(...): {e}") from None
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple) and \
                    isinstance(node.value, ast.Call):
                op = _op_name(_dotted(node.value.func), aliases)
                if op:
                    returns = len(_schema(op).returns)
                    assert len(node.targets[0].elts) == returns, \
                        f"{block.where}: {op} returns {returns} tensors"
    # README's snippet calls dispatch and combine; api.md's example calls every op
    assert checked >= len(PUBLIC_OPS) + 2, f"only {checked} op calls in the docs' Python blocks"


_SPAN = re.compile(r"`([^`]+)`")
_CALL = re.compile(r"(?:torch\.ops\.deep_ep\.|deep_ep_ops\.)?(\w+)\((.*)\)")


def _is_signature(call: ast.Call) -> bool:
    """``f(a, b, c=1)``: names and literal defaults, not values."""
    def literal(node):
        return isinstance(node, ast.Constant) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant))
    return all(isinstance(a, ast.Name) for a in call.args) and \
        all(literal(k.value) for k in call.keywords)


def _check_signature(where: str, op: str, call: ast.Call) -> None:
    args = _schema(op).arguments
    by_name = {a.name: a for a in args}
    for i, a in enumerate(call.args):
        assert i < len(args) and a.id == args[i].name, \
            f"{where}: argument {i} of {op} is {args[i].name if i < len(args) else 'none'}, " \
            f"written {a.id}"
    for kw in call.keywords:
        arg = by_name.get(kw.arg)
        assert arg is not None, f"{where}: {op} has no argument {kw.arg!r}"
        assert arg.has_default_value(), f"{where}: {op}'s {kw.arg} has no default"
        assert ast.literal_eval(kw.value) == arg.default_value, \
            f"{where}: {op}'s {kw.arg} defaults to {arg.default_value!r}"
    _check_binds(where, op, call)


def _inline_calls():
    """(where, op, call, text after the span) of every inline code span that is an op call."""
    for path in DOCS:
        prose = _prose(path)
        for m in _SPAN.finditer(prose):
            text = " ".join(m.group(1).split())
            cm = _CALL.fullmatch(text)
            if not cm or cm.group(1) not in PUBLIC_OPS:
                continue
            where = f"{path.relative_to(ROOT)}:{prose[:m.start()].count(chr(10)) + 1}"
            call = ast.parse(f"f({cm.group(2)})", mode="eval").body
            yield where, cm.group(1), call, prose[m.end():m.end() + 400]


def test_op_signatures_in_prose_match_the_schemas() -> None:
    signatures = calls = 0
    for where, op, call, after in _inline_calls():
        if _is_signature(call):
            _check_signature(where, op, call)
            signatures += 1
            ret = re.match(r"\s*(?:→|->)\s*`\(([^`]*)\)`", after)
            if ret:
                names = [n.strip() for n in " ".join(ret.group(1).split()).split(",")]
                assert names == [r.name for r in _schema(op).returns], \
                    f"{where}: {op} returns {[r.name for r in _schema(op).returns]}"
        else:
            _check_binds(where, op, call)
            calls += 1
    # README lists every op as a signature; api.md shows a call of each
    assert signatures >= len(PUBLIC_OPS) and calls >= len(PUBLIC_OPS), (signatures, calls)


def test_a_call_written_as_the_old_readme_did_is_caught() -> None:
    """The checker itself: the README once gave ``combine(x, handle, weights=None)``."""
    call = ast.parse("f(x, handle, weights=None)", mode="eval").body
    with pytest.raises(AssertionError, match="has no default"):
        _check_signature("example", "combine", call)
    call = ast.parse("f(table, indices)", mode="eval").body
    with pytest.raises(AssertionError, match=r"needs \['group_name'\]"):
        _check_signature("example", "engram_fetch", call)


# -- handle columns --------------------------------------------------------------------------

def test_handle_columns_in_the_contract_match_handle_py() -> None:
    contract = (ROOT / "docs" / "contract.md").read_text()
    rows = re.findall(r"^\| (\d+)(?: \+ [^|]*)? \| `([A-Z_]+)`(?: \+ \w)? \|", contract, re.M)
    documented = {name: int(col) for col, name in rows}
    constants = {name: value for name, value in vars(H).items()
                 if re.fullmatch(r"(HDR|SEND|RAIL|RECV|GROUP)_[A-Z_]+", name) and type(value) is int}
    assert documented == constants, f"contract.md lists {documented}, handle.py has {constants}"
    assert f"W = max(1 + 2K, 7 + K, {H.NUM_HEADER_FIELDS})" in contract
    assert H.handle_width(5) == max(1 + 2 * 5, 7 + 5, H.NUM_HEADER_FIELDS) and H.HEADER_ROWS == 1


# -- runnable snippets ----------------------------------------------------------------------

def _runnable() -> list[Block]:
    return [b for b in _all_blocks("python") if b.text.startswith("# run: ")]


def test_docs_have_runnable_snippets() -> None:
    where = {b.path.name for b in _runnable()}
    assert {"README.md", "api.md"} <= where, where


@pytest.mark.parametrize("block", _runnable(), ids=lambda b: b.where)
def test_snippet_runs_as_written(block: Block, tmp_path: Path) -> None:
    command = block.text.splitlines()[0][len("# run: "):].split()
    script = command[-1]
    (tmp_path / script).write_text(block.text)
    if command[0] == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run"] + command[1:]
    elif command[0] == "python":
        command = [sys.executable] + command[1:]
    nproc = int(command[command.index("--nproc-per-node") + 1]) \
        if "--nproc-per-node" in command else 1
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{block.where}: {' '.join(command)} failed:\n{output[-4000:]}"
    for r in range(nproc):
        assert f"rank {r}:" in run.stdout, f"{block.where}: no line from rank {r}:\n{output}"
