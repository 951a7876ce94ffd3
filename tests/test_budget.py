"""The project's size budgets and "plain over packed" rules, checked on every test run so that they
keep holding as work lands.

This is an educational reference implementation: people read each file top to bottom, next to the
paper, and fork it (shared/notes/style.md). The budgets keep a file small enough to read in one sitting:

- at most 850 code lines in train.py, 760 in diagnose.py, 600 in every other module;
- no line over 110 characters (a line should fit on the screen without scrolling sideways);
- at least a quarter of the non-blank lines of the two scripts are comments or docstrings (they are read
  next to the paper);
- a README of at most 360 lines;
- nothing at the top of the repository beyond the README, the requirements, the six modules, tests/
  and .ci/.

A line budget measures size; it is not a target to pack into. Code packed to fit a line count is harder
to read than the same logic written over more lines, so the packing tricks this project has seen in its
own files are rejected outright, each by its own test that lists file:line of every offence:

1. A lambda bound to a name (`f = lambda x: ...`, also on an attribute or with an annotation): a
   `def` has a name in tracebacks, a docstring and room for a comment; the lambda only saves a line.
   A lambda passed as an argument or as a default (`sorted(xs, key=lambda x: -x)`) is fine.
2. A lambda whose body is a comprehension: a loop hidden inside an anonymous one-liner, usually run
   for its side effects, which the reader has to unpack twice.
3. A list, tuple or string multiplied by a condition (`[x] * bool(flag)`, `" (baseline)" * (run == base)`,
   `["--a=1"] * (m == "cds")`) or by a name holding one (best effort: `flag = a == b`, a parameter
   defaulting to True/False, a name unpacked from a module-level table of tuples holding booleans): it
   relies on True == 1 and reads as arithmetic; an `if` says it.
4. A statement or a `return` that is `and`/`or` around a call (`out and out.close()`,
   `return print(x) or 0`): control flow disguised as a value; an `if` says it.
5. A backslash line continuation: brackets continue a line just as well and survive an edit; the
   backslash-continued tuple assignment is how several statements got folded into one.
6. A comprehension whose value is thrown away (`[print(x) for x in xs]`): a `for` loop run for its
   side effects, which builds a list nobody reads.
7. A function body over 50 code lines: a function that long does several jobs; splitting it names
   each job.

Code lines are counted by ../shared/tools/codelines.py (the tool the budgets were set with): lines
holding a token that is not a comment, a docstring or layout. Without it the budget tests are skipped.
The packing rules use only `ast` and `tokenize`; each rule is also run on a small packed snippet and on
its plain equivalent, so that a rule cannot silently stop flagging anything.
"""

import ast
import functools
import importlib.util
import io
import os
import shutil
import subprocess
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODELINES = os.path.join(ROOT, "..", "shared", "tools", "codelines.py")
SCRIPTS = ("train.py", "diagnose.py")
MODULES = ("model.py", "weighter.py", "bilevel.py", "data.py")
ALL_MODULES = (*SCRIPTS, *MODULES)
MAX_CODE_LINES = {"train.py": 850, "diagnose.py": 760, **{m: 600 for m in MODULES}}
MAX_LINE = 110
MIN_COMMENT_SHARE = 0.25
MAX_README_LINES = 360
MAX_FUNCTION_CODE_LINES = 50
TOP_LEVEL = {"README.md", "requirements.txt", *SCRIPTS, *MODULES, "tests", ".ci", ".gitignore"}

COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
LAYOUT_TOKENS = (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)


# ---------------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def measure():
    """codelines.measure(path) → (code lines, comment+docstring share of non-blank lines, wide lines)."""
    if not os.path.isfile(CODELINES):
        pytest.skip(f"no {os.path.normpath(CODELINES)} to count code lines with")
    spec = importlib.util.spec_from_file_location("codelines", CODELINES)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.measure


@pytest.mark.parametrize("name", ALL_MODULES)
def test_code_lines_within_budget(measure, name):
    code, _, _ = measure(os.path.join(ROOT, name))
    assert code <= MAX_CODE_LINES[name], f"{name}: {code} code lines, budget {MAX_CODE_LINES[name]}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_at_least_a_quarter_comments_and_docstrings(measure, name):
    _, share, _ = measure(os.path.join(ROOT, name))
    message = f"{name}: {share:.1%} comments and docstrings, at least {MIN_COMMENT_SHARE:.0%}"
    assert share >= MIN_COMMENT_SHARE, message


@pytest.mark.parametrize("name", ALL_MODULES)
def test_no_line_over_110_characters(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        lines = f.read().splitlines()
    wide = [f"{name}:{i} ({len(line)} chars)" for i, line in enumerate(lines, 1) if len(line) > MAX_LINE]
    assert not wide, f"lines over {MAX_LINE} characters: " + ", ".join(wide)


def test_readme_within_budget():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= MAX_README_LINES, f"README.md: {n} lines, budget {MAX_README_LINES}"


def test_top_level_holds_only_the_project_files():
    """What git tracks at the top (untracked and ignored files, such as runs/ or out/, do not count)."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"git ls-files failed: {res.stderr.strip()}")
    top = {p.split("/", 1)[0] for p in res.stdout.split("\0") if p}
    assert top <= TOP_LEVEL, f"unexpected at the top of the repository: {sorted(top - TOP_LEVEL)}"


# ---------------------------------------------------------------------------------------------------
# Packing rules: each offences_<rule>(tree, source) returns the lines of its offences, sorted, once each.
# ---------------------------------------------------------------------------------------------------

def offences_lambda_bound_to_name(tree, source):
    """Rule 1: `f = lambda ...`, `obj.f = lambda ...`, `f: T = lambda ...`, `a, b = lambda ..., ...`."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            lines += [v.lineno for v in values if isinstance(v, ast.Lambda)]
    return sorted(set(lines))


def offences_lambda_of_comprehension(tree, source):
    """Rule 2: `lambda xs: [f(x) for x in xs]`."""
    return sorted({node.lineno for node in ast.walk(tree)
                   if isinstance(node, ast.Lambda) and isinstance(node.body, COMPREHENSIONS)})


def is_sequence_literal(node):
    """A list, a tuple or a string written in place (parentheses do not show in the tree)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    return isinstance(node, (ast.List, ast.ListComp, ast.Tuple, ast.JoinedStr))


def is_name_in(node, names):
    if not isinstance(node, ast.Name):
        return False
    return node.id in names


def is_condition(node, bool_names):
    """A comparison, `bool(...)`, `not ...`, `and`/`or`, True/False, or a name that holds one of them."""
    if isinstance(node, (ast.Compare, ast.BoolOp)):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return True
    if isinstance(node, ast.Constant):
        return isinstance(node.value, bool)
    if isinstance(node, ast.Call):
        return is_name_in(node.func, {"bool"})
    return is_name_in(node, bool_names)


def nodes_in_scope(scope):
    """The nodes of a module, class or function body, down to (and including) nested defs and classes."""
    for child in ast.iter_child_nodes(scope):
        yield child
        if not isinstance(child, (*FUNCTIONS, ast.ClassDef)):
            yield from nodes_in_scope(child)


def tuple_tables(tree):
    """The module's dicts of tuples, such as COMMANDS = {"sar": (cmd_sar, SAR_OPTIONS, True), ...}:
    {name: the tuples' elements}, so that `fn, table, flag = COMMANDS[sub]` can tell that flag is a bool."""
    tables = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            rows = node.value.values
            if rows and all(isinstance(row, ast.Tuple) for row in rows):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        tables[target.id] = [row.elts for row in rows]
    return tables


def assigned_values(node, tables):
    """(name, the values it may get) for each plain name an assignment binds: `a = x` gives a x;
    `a, b = x, y` gives a x; `a, b = TABLE[key]` gives a the first element of every tuple in TABLE."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    pairs = []
    for target in targets:
        if isinstance(target, ast.Name):
            pairs.append((target.id, [node.value]))
        elif isinstance(target, ast.Tuple):
            if isinstance(node.value, ast.Tuple):
                rows = [node.value.elts]
            elif isinstance(node.value, ast.Subscript) and isinstance(node.value.value, ast.Name):
                rows = tables.get(node.value.value.id, [])
            else:
                rows = []
            rows = [row for row in rows if len(row) == len(target.elts)]
            for i, element in enumerate(target.elts):
                if isinstance(element, ast.Name) and rows:
                    pairs.append((element.id, [row[i] for row in rows]))
    return pairs


def bool_names_of(scope, inherited, tables):
    """The names that `scope` binds to a condition, plus the ones it sees from enclosing functions.

    A best effort: a name counts if an assignment in the scope gives it a condition (every possible
    value a condition, for a name unpacked from a table), or if it is a parameter annotated `bool` or
    defaulting to True/False.
    """
    names = set(inherited)
    for node in nodes_in_scope(scope):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            for name, values in assigned_values(node, tables):
                if all(is_condition(value, names) for value in values):
                    names.add(name)
    if isinstance(scope, FUNCTIONS):
        args = scope.args
        positional = args.posonlyargs + args.args
        defaults = [None] * (len(positional) - len(args.defaults)) + args.defaults
        for arg, default in zip(positional + args.kwonlyargs, defaults + args.kw_defaults):
            annotated_bool = is_name_in(arg.annotation, {"bool"})
            defaults_to_bool = isinstance(default, ast.Constant) and isinstance(default.value, bool)
            if annotated_bool or defaults_to_bool:
                names.add(arg.arg)
    return names


def sequence_times_condition(scope, inherited, tables):
    """The lines in `scope` and the scopes inside it where a sequence is multiplied by a condition."""
    names = bool_names_of(scope, inherited, tables)
    lines = []
    for node in nodes_in_scope(scope):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            if is_sequence_literal(node.left) and is_condition(node.right, names):
                lines.append(node.lineno)
            elif is_sequence_literal(node.right) and is_condition(node.left, names):
                lines.append(node.lineno)
        elif isinstance(node, FUNCTIONS):
            lines += sequence_times_condition(node, names, tables)
        elif isinstance(node, ast.ClassDef):
            # A method does not see the names bound in its class body, only the module's.
            lines += sequence_times_condition(node, inherited, tables)
    return lines


def offences_sequence_times_condition(tree, source):
    """Rule 3: `[x] * bool(flag)`, `" (baseline)" * (run == base)`, `[...] * flag` with flag = (a == b)."""
    return sorted(set(sequence_times_condition(tree, set(), tuple_tables(tree))))


def offences_and_or_around_a_call(tree, source):
    """Rule 4: `out and out.close()` as a statement (any call inside); `return print(x) or 0` (a call
    in an operand before the last one, run for its effect: `return a or default(b)` is a plain value)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.BoolOp):
            if any(isinstance(inner, ast.Call) for inner in ast.walk(node.value)):
                lines.append(node.lineno)
        if isinstance(node, ast.Return) and isinstance(node.value, ast.BoolOp):
            early = node.value.values[:-1]
            if any(isinstance(inner, ast.Call) for operand in early for inner in ast.walk(operand)):
                lines.append(node.lineno)
    return sorted(set(lines))


def offences_backslash_continuation(tree, source):
    """Rule 5: a line continued with a backslash.

    Inside brackets tokenize emits an NL token at each line end; after a backslash it emits nothing,
    so the next token simply starts on a later line than the previous one ended. A backslash inside a
    string or a comment is part of that token and is not a continuation.
    """
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    lines = []
    for previous, token in zip(tokens, tokens[1:]):
        if previous.type in LAYOUT_TOKENS or token.type == tokenize.ENDMARKER:
            continue
        if token.start[0] > previous.end[0]:
            lines.append(previous.end[0])
    return sorted(set(lines))


def offences_discarded_comprehension(tree, source):
    """Rule 6: a comprehension as a statement, or as the body of a lambda (whose value is rarely used)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, COMPREHENSIONS):
            lines.append(node.lineno)
        elif isinstance(node, ast.Lambda) and isinstance(node.body, COMPREHENSIONS):
            lines.append(node.lineno)
    return sorted(set(lines))


def code_line_numbers(source):
    """The lines holding code, as codelines.py counts them: a token that is not a comment, layout, or a
    string standing alone as a statement (a docstring)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    significant = [t for t in tokens if t.type not in (tokenize.NL, tokenize.COMMENT)]
    lines = set()
    for i, token in enumerate(significant):
        if token.type in LAYOUT_TOKENS:
            continue
        if token.type == tokenize.STRING:
            starts_statement = i == 0 or significant[i - 1].type in LAYOUT_TOKENS
            ends_statement = i + 1 == len(significant) or significant[i + 1].type in (
                tokenize.NEWLINE, tokenize.ENDMARKER)
            if starts_statement and ends_statement:
                continue
        lines.update(range(token.start[0], token.end[0] + 1))
    return lines


def function_code_lines(function, code_lines):
    """Code lines in a function's body (its signature and decorators not included)."""
    body = range(function.body[0].lineno, function.end_lineno + 1)
    return len(code_lines.intersection(body))


def offences_long_function(tree, source):
    """Rule 7: a function whose body holds more than 50 code lines (nested functions included)."""
    code_lines = code_line_numbers(source)
    return sorted(node.lineno for node in ast.walk(tree) if isinstance(node, FUNCTIONS)
                  and function_code_lines(node, code_lines) > MAX_FUNCTION_CODE_LINES)


# ---------------------------------------------------------------------------------------------------
# The rules on the project's modules
# ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def parsed(name):
    """(tree, source) of one of the project's modules."""
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        source = f.read()
    return ast.parse(source, filename=name), source


def assert_no_offences(name, offences, what):
    tree, source = parsed(name)
    lines = offences(tree, source)
    assert not lines, f"{what}: " + ", ".join(f"{name}:{line}" for line in lines)


# rule → (its checker, how to write the line plainly)
PACKING_RULES = {
    "lambda bound to a name": (offences_lambda_bound_to_name, "write a def"),
    "lambda of a comprehension": (offences_lambda_of_comprehension, "write a def with a for loop"),
    "sequence times a condition": (offences_sequence_times_condition, "write an if"),
    "and/or around a call": (offences_and_or_around_a_call, "write an if"),
    "backslash continuation": (offences_backslash_continuation, "use brackets, or several statements"),
    "discarded comprehension": (offences_discarded_comprehension, "write a for loop"),
}


@pytest.mark.parametrize("rule", PACKING_RULES)
@pytest.mark.parametrize("name", ALL_MODULES)
def test_no_packing(name, rule):
    offences, hint = PACKING_RULES[rule]
    assert_no_offences(name, offences, f"{rule} ({hint})")


@pytest.mark.parametrize("name", ALL_MODULES)
def test_no_function_over_50_code_lines(name):
    tree, source = parsed(name)
    code_lines = code_line_numbers(source)
    lines = offences_long_function(tree, source)
    long = [f"{name}:{node.lineno} {node.name} ({function_code_lines(node, code_lines)} code lines)"
            for node in ast.walk(tree) if isinstance(node, FUNCTIONS) and node.lineno in lines]
    assert not long, f"functions over {MAX_FUNCTION_CODE_LINES} code lines: " + ", ".join(long)


# ---------------------------------------------------------------------------------------------------
# The rules on small snippets: each flags its packed snippet and passes its plain equivalent.
# ---------------------------------------------------------------------------------------------------

def long_function(statements):
    """A function with a docstring, a comment, a blank line and `statements` code lines in its body."""
    body = [f"    x{i} = {i}" for i in range(statements - 1)]
    return "\n".join(['def f():', '    """Docstring.', '', '    Second line."""', '    # comment', '',
                      *body, '    return 0', ''])


# rule: (offences_<rule>, a packed snippet, the lines it must be flagged at, a plain equivalent)
SNIPPETS = {
    "lambda bound to a name": (offences_lambda_bound_to_name, '''\
square = lambda x: x * x
obj.f = lambda: 0
g: object = lambda: 1
''', [1, 2, 3], '''\
def square(x):
    return x * x
def f(key=lambda x: x):
    return sorted([2, 1], key=key)
sorted([2, 1], key=lambda x: -x)
'''),
    "lambda of a comprehension": (offences_lambda_of_comprehension, '''\
apply(lambda xs: [print(x) for x in xs])
''', [1], '''\
def show(xs):
    for x in xs:
        print(x)
apply(show)
'''),
    "sequence times condition": (offences_sequence_times_condition, '''\
args = ["--a=1"] * (m == "cds") + [x] * bool(flag)
label = " (baseline)" * (run == base)
train_settings = mode == "train"
extra = ["--lr=1"] * train_settings
def f(verbose=False):
    return [f"v={v}"] * verbose
TABLE = {"a": (f, True), "b": (f, False)}
def g(sub):
    fn, wide = TABLE[sub]
    return ["note"] * wide
''', [1, 2, 4, 6, 10], '''\
args = ["--a=1"] if m == "cds" else []
label = " (baseline)" if run == base else ""
pad = [0] * n
line = "-" * width
zeros = [0.0] * (n + 1)
SIZES = {"a": (f, 2), "b": (f, 3)}
def g(sub):
    fn, n = SIZES[sub]
    return ["x"] * n
'''),
    "and/or around a call": (offences_and_or_around_a_call, '''\
def f(out, x):
    out and out.close()
    return print(x) or 0
''', [2, 3], '''\
def f(out, x, a, b):
    if out:
        out.close()
    print(x)
    ok = x and len(x)
    return a or max(b, 1)
'''),
    "backslash continuation": (offences_backslash_continuation, r'''
a, b = 1, \
    2
''', [2], r'''
a, b = (1,
        2)
s = "a \\"
t = """x \
y"""
# a comment \
'''),
    "discarded comprehension": (offences_discarded_comprehension, '''\
[print(x) for x in xs]
{k: v for k, v in d}
''', [1, 2], '''\
for x in xs:
    print(x)
squares = [x * x for x in xs]
'''),
    "long function": (offences_long_function, long_function(51), [1], long_function(50)),
}


@pytest.mark.parametrize("rule", SNIPPETS)
def test_rule_flags_its_packed_snippet_and_not_the_plain_one(rule):
    offences, packed, expected, plain = SNIPPETS[rule]
    flagged = offences(ast.parse(packed), packed)
    message = f"{rule}: the packed snippet is flagged at lines {flagged}, not {expected}:\n{packed}"
    assert flagged == expected, message
    flagged = offences(ast.parse(plain), plain)
    assert not flagged, f"{rule}: the plain snippet is flagged at lines {flagged}:\n{plain}"
