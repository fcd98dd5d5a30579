"""The reports' fonts: found, and prepared once so that fpdf2 loads them fast.

Cyrillic needs a Unicode TTF: DejaVu Sans (`fonts-dejavu-core`), found in
REPORT_FONT_DIR (`find_fonts`) and cut down once, with fontTools' subsetter, to
what Russian and English reports use (`prepare_fonts`): fpdf2 parses the font
for each document (`FPDF.add_font`) and subsets it again on output, and both
cost in proportion to the glyphs the file holds (DejaVu's ~6,000 against the
~700 kept). Everything else is fpdf2's own, through its public API
(`reactor.clinic.services.pdf.layout`).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_IWGRP, S_IWOTH

import structlog

from reactor.clinic.settings import ConfigError
from reactor.engine.files import sweep_temp_files, write_whole_sync

__all__ = ["Fonts", "find_fonts", "log_missing_glyphs", "prepare_fonts", "present",
           "private_cache_dir"]

log = structlog.get_logger("reactor.pdf")


def _no_missing_glyph_lines(record: logging.LogRecord) -> bool:
    """fpdf2's own line quotes the characters a font lacks (they may spell a child's
    name); layout logs which scripts instead (`log_missing_glyphs`). This drops fpdf2's."""
    return not str(record.msg).startswith("Font %s is missing the following glyphs")


logging.getLogger("fpdf.output").addFilter(_no_missing_glyph_lines)


@dataclass(frozen=True)
class Fonts:
    regular: Path
    bold: Path
    # What prepared fonts were cut from: made again from it if a temp cleaner removes them
    # under a long-running reactor (`present`).
    source: Fonts | None = None


def check_pdf_libraries() -> None:
    """Refuse to start without fpdf2 or fontTools: they are imported only by the first
    report (or a cold font cache), and a missing one would fail every report then.
    Looking them up imports nothing."""
    for module, package in (("fpdf", "fpdf2"), ("fontTools", "fonttools")):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"reports need the {package} package, which is not installed: "
                              f"reinstall reactor from its wheel, or pip install {package}")


def find_fonts(font_dir: Path) -> Fonts:
    """DejaVu Sans in `font_dir`.

    Raises:
        ConfigError: naming REPORT_FONT_DIR and the package to install.
    """
    fonts = Fonts(font_dir / "DejaVuSans.ttf", font_dir / "DejaVuSans-Bold.ttf")
    for path in (fonts.regular, fonts.bold):
        if not path.is_file():
            raise ConfigError(f"report font {path} not found: apt-get install -y "
                              "fonts-dejavu-core, or set REPORT_FONT_DIR to a folder with "
                              "DejaVuSans.ttf and DejaVuSans-Bold.ttf")
    return fonts


# What Russian and English reports use; the rest of DejaVu's ~6,000 glyphs is left
# out, which makes loading the font many times faster (see prepare_fonts).
_UNICODES = [
    *range(0x20, 0x7F), *range(0xA0, 0x180),       # Latin, Latin-1, Latin Extended-A
    *range(0x400, 0x460), *range(0x490, 0x4D0),     # Cyrillic (Russian, Ukrainian, Belarusian…)
    *range(0x2000, 0x2070),                         # spaces, dashes, quotes, bullet, …
    0x20AC, 0x20BD, 0x2116, 0x2122,                 # €, ₽, №, ™
]


# Bumped whenever prepare_fonts' options change, so an old cached subset is not reused.
_PREPARED_VERSION = 2


def private_cache_dir(base: Path) -> Path:
    """A font cache only this user can write: `<base>/reactor-fonts-<uid>`, mode 0700.

    Every report embeds the prepared fonts: a cache another local user could create
    or write first (a shared /tmp outside systemd's PrivateTmp) would choose the font
    in every family's report. One that is not ours alone is not used: a fresh private
    directory is made instead.
    """
    cache = base / f"reactor-fonts-{os.getuid()}"
    try:
        cache.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(cache)
        if (S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
                and not info.st_mode & (S_IWGRP | S_IWOTH)):
            return cache
    except OSError:
        pass
    log.warning("font cache directory is not ours alone: using a fresh one",
                directory=str(cache))
    return Path(tempfile.mkdtemp(prefix="reactor-fonts-", dir=base))


def prepare_fonts(fonts: Fonts, cache_dir: Path) -> Fonts:
    """Subsets of the fonts, written once to `cache_dir`, that load in milliseconds.

    Only what a PDF embeds is kept: fpdf2 drops the layout tables and every name
    record but 0-6 from what it embeds anyway, and each table left out is work saved
    when each document subsets the font again.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(cache_dir)  # what a crash mid-write left
    prepared = []
    for source in (fonts.regular, fonts.bold):
        stat = source.stat()
        target = cache_dir / (f"{source.stem}-{stat.st_size}-{int(stat.st_mtime)}"
                              f"-v{_PREPARED_VERSION}.ttf")
        if not target.exists():
            from fontTools import subset  # 0.3 s to import: only when a cache is cold

            options = subset.Options()
            options.layout_features = []  # fpdf2 draws glyphs without shaping
            options.hinting = False
            options.drop_tables += ["FFTM", "GDEF", "GPOS", "GSUB", "gasp", "kern"]
            font = subset.load_font(str(source), options)
            subsetter = subset.Subsetter(options)
            subsetter.populate(unicodes=_UNICODES)
            subsetter.subset(font)
            prepared_font = io.BytesIO()
            subset.save_font(font, prepared_font, options)
            font.close()
            # Whole or not at all (two processes may prepare at once: each its own temp).
            write_whole_sync(target, prepared_font.getvalue())
        prepared.append(target)
    return Fonts(prepared[0], prepared[1], fonts)


def present(fonts: Fonts) -> Fonts:
    """`fonts`, prepared again if their files are gone (the same bytes: fontTools'
    subsetter keeps no timestamp of its own)."""
    if fonts.source is None or (fonts.regular.is_file() and fonts.bold.is_file()):
        return fonts
    return prepare_fonts(fonts.source, fonts.regular.parent)


def _script(code: int) -> str:
    """The first word of a character's Unicode name ("CJK", "HEBREW", "EMOJI"…)."""
    return unicodedata.name(chr(code), "UNKNOWN").split(" ", 1)[0]


def log_missing_glyphs(font: str, missing: list[int]) -> None:
    """Which scripts a font could not draw, and how many characters: never which ones."""
    if missing:
        log.warning("report font lacks characters, drawn as boxes", font=font,
                    count=len(missing), scripts=sorted({_script(c) for c in missing}))
