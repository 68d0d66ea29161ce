"""Corpus entries too big (or too empty) to keep as files: built when the test runs.

Each builder returns the task file's bytes, header comment included (the same
`# attacks:` / `# expect:` lines as the files beside this module), except the
empty file, which cannot hold a comment: its header is given as `meta`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Generated:
    name: str
    build: Callable[[], bytes]
    config: Callable[[], bytes] | None = None
    meta: dict[str, str] = field(default_factory=dict)
    """Header fields for a file that cannot carry them (the empty file)."""
    timeout: float = 120.0


def _head(attacks: str, expect: str, **extra: str) -> str:
    lines = [f"# attacks: {attacks}", f"# expect: {expect}"]
    lines += [f"# {k.replace('_', '-')}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def _task(tid: str, prompt: str = "'true'", output: str | None = None, agent: str = "shell",
          extra: str = "") -> str:
    out = output or f"{tid}.txt"
    return f"  - {{id: {tid}, agent: {agent}, prompt: {prompt}, output: {out}{extra}}}\n"


def tasks_100000() -> bytes:
    """100,000 tasks; the last one names an unknown dependency on line 100,004."""
    head = _head("100,000 tasks (6.8 MB), the last with an unknown dependency",
                 "refused", error_line="100005 (at: id: last)")
    body = "".join(_task(f"t{i}", output=f"o/t{i}.txt") for i in range(100_000))
    last = _task("last", extra=", dependencies: [nope]")
    return (head + "tasks:\n" + body + last).encode()


def cycle_10000() -> bytes:
    """A single dependency cycle through 10,000 tasks."""
    head = _head("a dependency cycle 10,000 tasks long", "refused",
                 error_line="5 (at: id: c0)")
    n = 10_000
    body = "".join(_task(f"c{i}", extra=f", dependencies: [c{(i + 1) % n}]") for i in range(n))
    return (head + "tasks:\n" + body).encode()


def unknown_deps_5000() -> bytes:
    """5,000 unknown dependencies (validation was quadratic in them before issue 9)."""
    head = _head("5,000 unknown dependencies, each with a did-you-mean search", "refused",
                 error_line="10 (at: - missing-0)")
    deps = "".join(f"      - missing-{i}\n" for i in range(5000))
    return (head + "tasks:\n  - id: missing\n    agent: shell\n    prompt: 'true'\n"
            "    output: a.txt\n    dependencies:\n" + deps).encode()


def huge_scalar() -> bytes:
    """A 16 MiB prompt (a shell comment): big, under the 32 MiB limit, and runs."""
    head = _head("a 16 MiB scalar (a shell prompt whose second line is one long comment)",
                 "ok")
    return (head + "tasks:\n  - id: a\n    agent: shell\n    output: a.txt\n    prompt: |\n"
            "      true\n      #" + "x" * (16 << 20) + "\n").encode()


def over_32_mib() -> bytes:
    """33 MiB of comments: refused by size before it is parsed."""
    head = _head("a 33 MiB file (the limit is 32 MiB)", "refused",
                 no_line="the whole file is refused by its size, before any line is read")
    return (head + ("#" * 1023 + "\n") * (33 * 1024)).encode()


def long_line() -> bytes:
    """One 1 MiB line: the whole file as a single flow mapping."""
    head = _head("a 1 MiB single line (a flow mapping with a long description)", "ok")
    return (head + "{description: '" + "y" * (1 << 20)
            + "', tasks: [{id: a, agent: shell, prompt: 'true', output: a.txt}]}\n").encode()


def shell_prompt_200k() -> bytes:
    """A 200 KiB shell script: over the 128 KiB argument limit, so it runs from a file."""
    head = _head("a 200 KiB prompt for the shell agent (an argument is limited to 128 KiB)",
                 "ok")
    script = "".join(f"      : line {i} {'z' * 80}\n" for i in range(2300)) + "      true\n"
    assert len(script) > 200 * 1024
    return (head + "tasks:\n  - id: a\n    agent: shell\n    output: a.txt\n    prompt: |\n"
            + script).encode()


ARG_AGENT = (b"# attacks: an agent that takes its prompt as one argument\n"
             b"[agents.argy]\ncommand = [\"/bin/sh\", \"-c\", \"true\"]\nprompt = \"arg\"\n")


def arg_prompt_128k() -> bytes:
    """131,072 bytes for an agent that takes the prompt as an argument: E2BIG."""
    head = _head("a 128 KiB prompt for an agent with prompt = \"arg\" (Linux: E2BIG)",
                 "refused", error_line="8 (at: prompt:)")
    return (head + "tasks:\n  - id: a\n    agent: argy\n    output: a.txt\n    prompt: "
            + "p" * (128 * 1024) + "\n").encode()


def arg_prompt_boundary() -> bytes:
    """131,071 bytes, the longest argument Linux accepts: valid, and it runs."""
    head = _head("a 131,071-byte prompt for a prompt = \"arg\" agent (the largest allowed)",
                 "ok")
    return (head + "tasks:\n  - id: a\n    agent: argy\n    output: a.txt\n    prompt: "
            + "p" * (128 * 1024 - 1) + "\n").encode()


def config_2_mib() -> bytes:
    return b"# attacks: a 2 MiB config (the limit is 1 MiB)\n" + (b"#" * 1023 + b"\n") * 2048


def config_2_mib_tasks() -> bytes:
    return (_head("a 2 MiB config file (see config_2_mib)", "refused",
                  no_line="the config is refused by its size, before any line is read")
            + "tasks:\n" + _task("a")).encode()


GENERATED: tuple[Generated, ...] = (
    Generated("gen_empty_file", lambda: b"",
              meta={"attacks": "an empty file (0 bytes: no room for this comment)",
                    "expect": "refused", "error-line": "1 (at: (blank))"}),
    Generated("gen_tasks_100000", tasks_100000, timeout=300),
    Generated("gen_cycle_10000", cycle_10000),
    Generated("gen_unknown_deps_5000", unknown_deps_5000),
    Generated("gen_huge_scalar_16mib", huge_scalar),
    Generated("gen_file_over_32mib", over_32_mib),
    Generated("gen_long_line_1mib", long_line),
    Generated("gen_shell_prompt_200k", shell_prompt_200k),
    Generated("gen_arg_prompt_128k", arg_prompt_128k, config=lambda: ARG_AGENT),
    Generated("gen_arg_prompt_boundary", arg_prompt_boundary, config=lambda: ARG_AGENT),
    Generated("gen_config_2mib", config_2_mib_tasks, config=config_2_mib),
)
