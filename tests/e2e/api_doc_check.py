#!/usr/bin/env python3
"""Runs the examples of docs/api.md against a running stack and checks their answers.

An example is a ```console block. Each `$ ` line (with `\\` continuation lines) is a command;
commands run in order in one bash process, so `TOKEN=$(...)` set-up lines carry over. When the
lines after a command show an answer (`HTTP/1.1 201 Created`, then header lines up to a blank
line), the command's output must have that status (the first non-1xx status line) and every
header name shown; a command without an answer must exit 0.

Environment: CP, SIDECAR, SIDECAR_ADMIN, PAYSIM (base URLs), and PATH with the binaries.
Usage: api_doc_check.py docs/api.md
"""

import os
import re
import subprocess
import sys
import tempfile

STATUS = re.compile(r"^HTTP/[0-9.]+ (\d{3})")
HEADER = re.compile(r"^([A-Za-z0-9-]+):")


def examples(path):
    """(line, command, status or None, [header names]) for each command of each console block."""
    lines = open(path, encoding="utf-8").read().split("\n")
    out = []
    i, in_console = 0, False
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            in_console = (not in_console) and line.strip() == "```console"
            i += 1
            continue
        if not (in_console and line.startswith("$ ")):
            i += 1
            continue
        start, command = i + 1, line[2:]
        while command.endswith("\\"):
            i += 1
            command += "\n" + lines[i]
        i += 1
        status, headers = None, []
        if i < len(lines) and STATUS.match(lines[i]):
            status = STATUS.match(lines[i]).group(1)
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("```", "$ ")):
                m = HEADER.match(lines[i])
                if m:
                    headers.append(m.group(1).lower())
                i += 1
        out.append((start, command, status, headers))
    return out


def answer(text):
    """The first final status of a curl -i output and the header names after it."""
    lines = text.replace("\r", "").split("\n")
    for n, line in enumerate(lines):
        m = STATUS.match(line)
        if m and not m.group(1).startswith("1"):
            names = set()
            for h in lines[n + 1:]:
                if not h.strip():
                    break
                hm = HEADER.match(h)
                if hm:
                    names.add(hm.group(1).lower())
            return m.group(1), names
    return None, set()


def main():
    doc = sys.argv[1]
    steps = examples(doc)
    if len(steps) < 20:
        print(f"not ok - {doc} has only {len(steps)} console examples; the parser or the document broke")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        script = ["set -u"]
        for n, (line, command, status, _) in enumerate(steps):
            if status is None:
                # Set-up: in this shell, so that its variables carry over; must succeed.
                script.append(f"{{\n{command}\n}} >{tmp}/{n}.out 2>&1 || {{ echo 'set-up at line {line} failed:'; cat {tmp}/{n}.out; exit 1; }}")
            else:
                script.append(f"( {command}\n) >{tmp}/{n}.out 2>&1")
        script.append("exit 0")
        run = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True, timeout=600)
        failed = 0
        if run.returncode != 0:
            print(f"not ok - {run.stdout}{run.stderr}")
            failed += 1
        checked = 0
        for n, (line, command, status, headers) in enumerate(steps):
            if status is None:
                continue
            try:
                text = open(f"{tmp}/{n}.out", encoding="utf-8", errors="replace").read()
            except FileNotFoundError:
                break
            got, names = answer(text)
            first = command.split("\n")[0]
            missing = [h for h in headers if h not in names]
            if got != status or missing:
                failed += 1
                print(f"not ok - {doc}:{line}: {first}\n    expected {status} with {headers}, got {got}; missing {missing}\n    output: {text[:600]!r}")
            else:
                checked += 1
                print(f"ok - {doc}:{line}: {status} {first[:110]}")
    print(f"api-doc: {checked} examples answered as documented, {failed} did not")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
