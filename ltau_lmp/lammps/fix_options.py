"""The keywords of ``fix ID group ltau ESTIMATOR keyword value ...`` (doc/fix_ltau.md).

``FixOptions.parse`` is their only parser: one handler per keyword (``KEYWORDS``), then the
checks that tie keywords together. No LAMMPS, MPI or estimator is needed here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ltau_lmp.errors import LTAUError
from ltau_lmp.lammps import abi
from ltau_lmp.lammps import keywords as kw
from ltau_lmp.lammps.keywords import Words

METRICS = ("expected", "upper", "distance", "ood")
AUTO = "auto"
# keywords that only make sense with halt THRESH (fix halt's `error` and `message`)
HALT_KEYWORDS = ("error", "message")


@dataclass
class FixOptions:
    """Parsed keywords of ``fix ltau`` (see doc/fix_ltau.md)."""

    estimator: str
    every: int = 1
    k: int | None = None
    metric: str = "expected"
    ci: tuple[float, float] | None = (0.05, 0.95)   # None: `ci no`, columns 2-3 stay 0 (no PDF mixing)
    quantile: float = 0.99
    halt: float | str | None = None  # a threshold, "auto" (the estimator's), or None
    halt_over: int = 1                # evaluations over the threshold, among the last halt_within,
    halt_within: int | None = None    # before halting (within None = over: that many in a row)
    halt_mode: str = "soft"           # fix halt's default
    halt_message: bool = True
    dump_file: str | None = None
    dump_threshold: float | str | None = None
    dump_interval: int = 1
    dump_max: int | None = None
    log_file: str | None = None
    append: bool = False              # continue the log and dump of an earlier run (restart)

    @classmethod
    def parse(cls, args: list[str]) -> "FixOptions":
        if not args:
            raise LTAUError("usage is fix ID group ltau ESTIMATOR_FILE keyword value ...")
        opts, words = cls(estimator=args[0]), Words(args[1:])
        given: set[str] = set()
        while words:
            keyword = words.pop()
            handler = KEYWORDS.get(keyword)
            if handler is None:
                raise LTAUError(f"unknown keyword {keyword!r} (valid: {', '.join(KEYWORDS)})")
            handler(opts, words, keyword)
            given.add(keyword)
        opts._check(given & set(HALT_KEYWORDS))
        return opts

    def _check(self, needs_halt: set[str]) -> None:
        """What no single keyword's handler can see: keywords that need one another."""
        if self.ci is None and self.metric == "upper":
            raise LTAUError("metric upper is the CI's upper end: it needs ci LO HI, not ci no")
        if self.append and not (self.log_file or self.dump_file):
            raise LTAUError("append yes continues the log and dump files: it needs log FILE or dump FILE THRESH")
        if needs_halt and self.halt is None:
            raise LTAUError(f"keyword {' and '.join(sorted(needs_halt))} needs halt THRESH")
        for what, value in (("halt", self.halt), ("dump", self.dump_threshold)):
            if self.metric == "ood" and isinstance(value, float) and value > 1.0:
                raise LTAUError(f"{what} threshold of metric ood is a p-value in [0, 1], got {value}")

    @property
    def halt_mode_code(self) -> int:
        """The plugin's ``ltau_halt_mode``."""
        return abi.HALT_NONE if self.halt is None else abi.HALT_MODES[self.halt_mode]


def _threshold_or_auto(text: str, what: str) -> float | str:
    return AUTO if text == AUTO else kw.threshold(text, what)


# One handler per keyword: (options, the remaining words, the keyword) -> None, reading the
# keyword's values from the words.

def _every(o: FixOptions, words: Words, keyword: str) -> None:
    o.every = kw.positive_int(words.take(keyword, "N"), keyword)


def _k(o: FixOptions, words: Words, keyword: str) -> None:
    o.k = kw.positive_int(words.take(keyword, "K"), keyword)


def _metric(o: FixOptions, words: Words, keyword: str) -> None:
    o.metric = kw.choice(words.take(keyword, "|".join(METRICS)), keyword, METRICS)


def _ci(o: FixOptions, words: Words, keyword: str) -> None:
    if words.peek() == "no":
        words.pop()
        o.ci = None
        return
    lo = kw.number(words.take(keyword, "LO HI|no"), "ci LO")
    hi = kw.number(words.take(keyword, "LO HI"), "ci HI")
    if not 0.0 <= lo < hi <= 1.0:
        raise LTAUError(f"ci needs 0 <= LO < HI <= 1, got {lo} {hi}")
    o.ci = (lo, hi)


def _quantile(o: FixOptions, words: Words, keyword: str) -> None:
    o.quantile = kw.number(words.take(keyword, "Q"), keyword)
    if not 0.0 <= o.quantile <= 1.0:
        raise LTAUError(f"quantile must lie in [0, 1], got {o.quantile}")


def _halt(o: FixOptions, words: Words, keyword: str) -> None:
    """halt THRESH|auto [over K [within N]]"""
    o.halt = _threshold_or_auto(words.take(keyword, "THRESH|auto"), keyword)
    if words.peek() != "over":
        return
    words.pop()
    o.halt_over = kw.positive_int(words.take("halt ... over", "K"), "halt ... over")
    if words.peek() != "within":
        return
    words.pop()
    o.halt_within = kw.positive_int(words.take("halt ... within", "N"), "halt ... within")
    if o.halt_within < o.halt_over:
        raise LTAUError(f"halt ... over {o.halt_over} within {o.halt_within}: N must be at least K")


def _error(o: FixOptions, words: Words, keyword: str) -> None:
    o.halt_mode = kw.choice(words.take(keyword, "hard|soft|continue"), keyword, tuple(abi.HALT_MODES))


def _message(o: FixOptions, words: Words, keyword: str) -> None:
    o.halt_message = kw.yes_no(words.take(keyword, "yes|no"), keyword)


def _dump(o: FixOptions, words: Words, keyword: str) -> None:
    """dump FILE THRESH|auto [interval N] [max M]"""
    o.dump_file = words.take(keyword, "FILE THRESH")
    o.dump_threshold = _threshold_or_auto(words.take(keyword, "FILE THRESH|auto"), keyword)
    while words.peek() in ("interval", "max"):
        sub = words.pop()
        value = kw.positive_int(words.take(f"dump ... {sub}", "a positive integer"), f"dump ... {sub}")
        if sub == "interval":
            o.dump_interval = value
        else:
            o.dump_max = value


def _log(o: FixOptions, words: Words, keyword: str) -> None:
    o.log_file = words.take(keyword, "FILE")


def _append(o: FixOptions, words: Words, keyword: str) -> None:
    o.append = kw.yes_no(words.take(keyword, "yes|no"), keyword)


KEYWORDS = {"every": _every, "k": _k, "metric": _metric, "ci": _ci, "quantile": _quantile, "halt": _halt,
            "error": _error, "message": _message, "dump": _dump, "log": _log, "append": _append}
