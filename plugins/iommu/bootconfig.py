"""The kernel command line of the next boot: what it says about the IOMMU, and edits to it.

Pure functions, no I/O.  Two sources are understood:

* GRUB's defaults: ``/etc/default/grub`` and its ``/etc/default/grub.d/*.cfg``
  drop-ins, which grub-mkconfig sources after it (so they override).  The
  kernel command line of the default entry is ``GRUB_CMDLINE_LINUX`` followed
  by ``GRUB_CMDLINE_LINUX_DEFAULT``.  Edits keep every other line, comment,
  flag and the quoting style as they were.
* ``grubby --info=...`` output (RHEL family): ``args="..."`` of each entry.

The kernel's own rules decide what a set of flags means: the last
``intel_iommu=``/``amd_iommu=`` wins, ``iommu=off`` turns every IOMMU off, and
without a flag Intel's IOMMU is off (unless the kernel was built with
CONFIG_INTEL_IOMMU_DEFAULT_ON) while AMD's is on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.cpuinfo import AMD, vendor_flag, vendor_key

VARS = ("GRUB_CMDLINE_LINUX", "GRUB_CMDLINE_LINUX_DEFAULT")
PASSTHROUGH = "iommu=pt"

_ASSIGN = re.compile(r"^(?P<head>\s*(?:export\s+)?(?P<var>[A-Za-z_][A-Za-z0-9_]*)=)(?P<rest>.*)$",
                     re.S)
_EXPAND = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


class BootConfigError(Exception):
    """The boot configuration cannot be read or edited safely; the message says why."""


# --------------------------------------------------------------------------
# What flags mean
# --------------------------------------------------------------------------

def _key_options(token: str) -> tuple[str, list[str]]:
    key, _, value = token.partition("=")
    return key, [o.strip() for o in value.split(",")] if value else []


def is_relevant(token: str) -> bool:
    """A flag that changes what the IOMMU does."""
    key, _ = _key_options(token)
    return (key in ("intel_iommu", "amd_iommu", "iommu") or key.startswith("iommu.")
            or key.startswith("amd_iommu_") or key == "vfio_iommu_type1.allow_unsafe_interrupts")


def kernel_tokens(cmdline: str) -> list[str]:
    """The kernel's own parameters: everything after "--" belongs to init."""
    tokens = cmdline.split()
    return tokens[:tokens.index("--")] if "--" in tokens else tokens


def relevant(tokens: list[str]) -> list[str]:
    return [t for t in tokens if is_relevant(t)]


def _switched(token: str, key: str) -> bool | None:
    """True/False when token turns key on/off, None when it says neither."""
    k, options = _key_options(token)
    if k != key:
        return None
    if "off" in options:
        return False
    if "on" in options:
        return True
    return None


def effective(tokens: list[str], kind: str | None, intel_default_on: bool = False) -> tuple[bool, str]:
    """(enabled, why) for a kernel command line on a CPU of this kind."""
    for t in tokens:
        if _key_options(t) == ("iommu", ["off"]):
            return False, "iommu=off disables every IOMMU"
    if kind is None:   # not x86 Intel/AMD: only an explicit flag says anything
        found = [t for t in tokens if _switched(t, "intel_iommu") or _switched(t, "amd_iommu")]
        if found:
            return True, f"{found[-1]} is set"
        return False, "unknown CPU vendor and no intel_iommu=on/amd_iommu=on flag"
    key = vendor_key(kind)
    last = None
    for t in tokens:
        switched = _switched(t, key)
        if switched is not None:
            last = (switched, t)
    if last is not None:
        return last[0], f"{last[1]} is set"
    if kind == AMD:
        return True, "AMD's IOMMU is on by default in the kernel unless amd_iommu=off is set"
    if intel_default_on:
        return True, ("this kernel turns Intel's IOMMU on by default "
                      "(CONFIG_INTEL_IOMMU_DEFAULT_ON=y) unless intel_iommu=off is set")
    return False, "intel_iommu=on is not set (Intel's IOMMU is off by default)"


# --------------------------------------------------------------------------
# GRUB defaults: parsing
# --------------------------------------------------------------------------

@dataclass
class Assignment:
    """One top-level ``NAME=value`` line of a GRUB defaults file."""
    file: int                 # index into the list of files
    line: int                 # index into that file's lines
    var: str
    head: str                 # leading blanks, "export ", "NAME="
    quote: str                # '"', "'" or "" (unquoted)
    raw: str                  # the text between the quotes, as written
    tail: str                 # what follows the value: blanks, a comment, the newline

    def render(self, raw: str) -> str:
        quote = self.quote
        if not quote and re.search(r"\s", raw):
            quote = '"'       # an unquoted value that now holds several flags
        return f"{self.head}{quote}{raw}{quote}{self.tail}"


@dataclass
class GrubFile:
    path: str
    text: str
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lines = self.text.splitlines(keepends=True)


def _parse_value(rest: str, where: str, strict: bool) -> tuple[str, str, str] | None:
    """(quote, raw, tail) of the text after "NAME=", or None when it is not simple."""
    if rest[:1] == '"':
        i = 1
        while i < len(rest):
            if rest[i] == "\\":
                i += 2
                continue
            if rest[i] == '"':
                return '"', rest[1:i], rest[i + 1:]
            i += 1
    elif rest[:1] == "'":
        end = rest.find("'", 1)
        if end > 0:
            return "'", rest[1:end], rest[end + 1:]
    else:
        m = re.match(r"[^\s\"'#;`()|&<>]*", rest)
        raw, tail = m.group(0), rest[m.end():]
        if tail[:1] not in ('"', "'", "`", "(") and not raw.endswith("\\"):
            return "", raw, tail
    if strict:
        raise BootConfigError(
            f"{where}: the value is not a simple quoted string on one line (a multi-line or "
            "composite value); edit it by hand or simplify it")
    return None


def assignments(files: list[GrubFile]) -> list[Assignment]:
    """Every top-level assignment, in the order grub-mkconfig sources them."""
    found = []
    for fi, f in enumerate(files):
        for li, line in enumerate(f.lines):
            m = _ASSIGN.match(line)
            if not m:
                continue
            var = m.group("var")
            parsed = _parse_value(m.group("rest"), f"{f.path}:{li + 1}", strict=var in VARS)
            if parsed is not None:
                found.append(Assignment(fi, li, var, m.group("head"), *parsed))
    return found


def _expand(a: Assignment, env: dict[str, str]) -> str:
    """The value as the shell would see it: quotes, backslashes, $VAR and ${VAR}."""
    if a.quote == "'":
        return a.raw
    out, i, raw = [], 0, a.raw
    while i < len(raw):
        c = raw[i]
        if c == "\\" and i + 1 < len(raw):
            nxt = raw[i + 1]
            if a.quote == '"' and nxt not in '$`"\\\n':
                out.append(c)
            elif nxt != "\n":
                out.append(nxt)
            i += 2
            continue
        if c == "$":
            m = _EXPAND.match(raw, i)
            if m:
                out.append(env.get(m.group(1) or m.group(2), ""))
                i = m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def evaluate(files: list[GrubFile]) -> dict[str, str]:
    """The values of GRUB_CMDLINE_LINUX and GRUB_CMDLINE_LINUX_DEFAULT after all files."""
    env: dict[str, str] = {}
    for a in assignments(files):
        env[a.var] = _expand(a, env)
    return {v: env.get(v, "") for v in VARS}


def cmdline_tokens(files: list[GrubFile]) -> list[str]:
    """The flags of the default boot entry: GRUB_CMDLINE_LINUX, then _DEFAULT."""
    values = evaluate(files)
    return values["GRUB_CMDLINE_LINUX"].split() + values["GRUB_CMDLINE_LINUX_DEFAULT"].split()


# --------------------------------------------------------------------------
# GRUB defaults: editing
# --------------------------------------------------------------------------

def _split(raw: str) -> tuple[list[list[str]], str]:
    """[[blanks, token], ...] and the trailing blanks, so unchanged text stays as written."""
    parts = [[m.group(1), m.group(2)] for m in re.finditer(r"(\s*)(\S+)", raw)]
    consumed = sum(len(a) + len(b) for a, b in parts)
    return parts, raw[consumed:]


def _join(parts: list[list[str]], trailing: str, lead: str) -> str:
    if parts:
        parts[0][0] = lead
    return "".join(a + b for a, b in parts) + trailing


@dataclass
class Plan:
    """The outcome of an edit: new texts of the files that change, and what the result says."""
    changes: dict[str, tuple[str, str]]     # path -> (old text, new text)
    tokens: list[str]                       # the default entry's flags afterwards
    enabled: bool
    why: str
    added: list[str]
    removed: list[str]


def _on_token(token: str) -> bool:
    return any(_switched(token, k) for k in ("intel_iommu", "amd_iommu")) or token == PASSTHROUGH


def plan(files: list[GrubFile], want_enabled: bool, kind: str | None,
         intel_default_on: bool = False) -> Plan:
    """Edit GRUB_CMDLINE_LINUX so the next boot has the IOMMU on (or off).

    Enabled: the vendor flag and iommu=pt are added to the last assignment of
    GRUB_CMDLINE_LINUX (a new line when there is none); flags that would undo
    them (intel_iommu=off, iommu=off) are taken out wherever they are, and an
    off flag in the edited value is replaced in place.  Disabled: every on
    flag and iommu=pt are taken out of both variables in every file, and the
    vendor's off flag is added when the kernel would otherwise turn the IOMMU
    on by itself (AMD).  Our own flags are never left duplicated.
    """
    if want_enabled and kind is None:
        raise BootConfigError("the CPU vendor is neither Intel nor AMD: no known flag enables its IOMMU")
    files = [GrubFile(f.path, f.text) for f in files]
    if not files:
        raise BootConfigError("no GRUB defaults file to edit")
    found = assignments(files)
    cmdline = [a for a in found if a.var in VARS]
    target = next((a for a in reversed(cmdline) if a.var == "GRUB_CMDLINE_LINUX"), None)
    key = vendor_key(kind)
    on_flag, off_flag = vendor_flag(kind, True), vendor_flag(kind, False)
    added: list[str] = []
    removed: list[str] = []
    new_raw: dict[int, tuple[list[list[str]], str, str]] = {}
    for n, a in enumerate(cmdline):
        parts, trailing = _split(a.raw)
        new_raw[n] = (parts, trailing, parts[0][0] if parts else "")

    def drop(pred) -> None:
        for n, a in enumerate(cmdline):
            parts, trailing, lead = new_raw[n]
            keep = []
            for p in parts:
                if pred(p[1], a):
                    removed.append(p[1])
                else:
                    keep.append(p)
            new_raw[n] = (keep, trailing, lead)

    if want_enabled:
        def undoes(tok: str, a: Assignment) -> bool:
            return _switched(tok, key) is False or _key_options(tok) == ("iommu", ["off"])
        if target is not None:
            # intel_iommu=off in the value we edit becomes intel_iommu=on where it stood.
            parts = new_raw[cmdline.index(target)][0]
            for p in parts:
                if _switched(p[1], key) is False and not any(_switched(q[1], key) for q in parts):
                    removed.append(p[1])
                    p[1] = on_flag
                    added.append(on_flag)
                    break
        drop(undoes)
    else:
        drop(lambda tok, a: _on_token(tok))

    def current() -> list[str]:
        text = {}
        for n, a in enumerate(cmdline):
            parts, trailing, lead = new_raw[n]
            text[n] = a.render(_join([list(p) for p in parts], trailing, lead))
        trial = [GrubFile(f.path, f.text) for f in files]
        for n, a in enumerate(cmdline):
            trial[a.file].lines[a.line] = text[n]
        return cmdline_tokens([GrubFile(f.path, "".join(f.lines)) for f in trial])

    wanted: list[str] = []
    tokens = current()
    if want_enabled:
        if not any(_switched(t, key) for t in tokens):
            wanted.append(on_flag)
        if PASSTHROUGH not in tokens:
            wanted.append(PASSTHROUGH)
    elif effective(tokens, kind, intel_default_on)[0] and off_flag and off_flag not in tokens:
        wanted.append(off_flag)

    # Never leave our own flags twice in one value.
    ours = {t for t in (on_flag, off_flag, PASSTHROUGH) if t}
    for n in new_raw:
        parts, trailing, lead = new_raw[n]
        seen: set[str] = set()
        keep = []
        for p in parts:
            if p[1] in ours and p[1] in seen:
                removed.append(p[1])
                continue
            seen.add(p[1])
            keep.append(p)
        new_raw[n] = (keep, trailing, lead)

    extra_line = None
    if wanted:
        added += wanted
        if target is not None:
            parts, trailing, lead = new_raw[cmdline.index(target)]
            for t in wanted:
                parts.append([" " if parts else "", t])
            new_raw[cmdline.index(target)] = (parts, trailing, lead)
        else:
            extra_line = f'GRUB_CMDLINE_LINUX="{" ".join(wanted)}"\n'

    new_lines = [list(f.lines) for f in files]
    for n, a in enumerate(cmdline):
        parts, trailing, lead = new_raw[n]
        if [p[1] for p in parts] == a.raw.split():
            continue          # untouched: keep the line byte for byte
        raw = _join(parts, trailing, lead) if parts else ""
        new_lines[a.file][a.line] = a.render(raw)
    if extra_line is not None:
        main = new_lines[0]
        last_default = max((a.line for a in cmdline if a.file == 0), default=None)
        if main and not main[-1].endswith("\n"):
            main[-1] += "\n"
        at = last_default + 1 if last_default is not None else len(main)
        main.insert(at, extra_line)

    result = [GrubFile(f.path, "".join(lines)) for f, lines in zip(files, new_lines)]
    tokens = cmdline_tokens(result)
    enabled, why = effective(tokens, kind, intel_default_on)
    if enabled != want_enabled:
        raise BootConfigError(
            f"after the edit the default boot entry would still have the IOMMU "
            f"{'on' if enabled else 'off'} ({why}); a value the agent cannot change "
            "(a variable from elsewhere?) decides it: edit the GRUB defaults by hand")
    changes = {f.path: (f.text, r.text) for f, r in zip(files, result) if f.text != r.text}
    return Plan(changes, tokens, enabled, why, added, removed)


# --------------------------------------------------------------------------
# grubby
# --------------------------------------------------------------------------

def parse_grubby_info(text: str) -> list[dict[str, str]]:
    """The entries of ``grubby --info=...``: index=, kernel=, args="...", ... per entry."""
    entries: list[dict[str, str]] = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = key.strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if key == "index" or not entries or key in entries[-1]:
            entries.append({})
        entries[-1][key] = value
    return [e for e in entries if "args" in e]


def grubby_edit(entries: list[dict[str, str]], want_enabled: bool, kind: str | None,
                intel_default_on: bool = False) -> tuple[list[str], list[str]]:
    """(args to add, args to remove) so that every entry has the IOMMU as wanted."""
    key = vendor_key(kind)
    add: list[str] = []
    remove: list[str] = []
    for e in entries:
        tokens = e["args"].split()
        if want_enabled:
            remove += [t for t in tokens if _switched(t, key) is False
                       or _key_options(t) == ("iommu", ["off"])]
            kept = [t for t in tokens if t not in remove]
            if not any(_switched(t, key) for t in kept):
                add.append(vendor_flag(kind))
            if PASSTHROUGH not in kept:
                add.append(PASSTHROUGH)
        else:
            remove += [t for t in tokens if _on_token(t)]
            kept = [t for t in tokens if t not in remove]
            off = vendor_flag(kind, False)
            if off and off not in kept and effective(kept, kind, intel_default_on)[0]:
                add.append(off)
    return list(dict.fromkeys(add)), list(dict.fromkeys(remove))
