"""The reports' fonts: found, prepared once, parsed once, embedded as a small subset.

Cyrillic needs a Unicode TTF: DejaVu Sans (`fonts-dejavu-core`), found in
REPORT_FONT_DIR (`find_fonts`) and cut down once to what Russian and English
reports use (`prepare_fonts`). Each font file is then parsed once per process and
shared read-only by every document and worker thread (`_add_font`), and each
document embeds only the outlines it uses (`_Producer`): what a report cost was
mostly fonts (the profile is in the comment above `_LOCK`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import struct
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from fontTools import ttLib
from fpdf import FPDF
from fpdf.fonts import SubsetMap, TTFFont
from fpdf.output import (
    CIDSystemInfo,
    OutputProducer,
    PDFFont,
    PDFFontStream,
    PDFType3Font,
    _build_cmap_blocks,
    _tt_font_widths,
)
from fpdf.syntax import Name, PDFArray, PDFContentStream

from reactor.clinic.settings import ConfigError
from reactor.engine.files import sweep_temp_files, write_whole_sync

__all__ = ["Fonts", "find_fonts", "prepare_fonts"]

log = structlog.get_logger("reactor.pdf")


def _no_missing_glyph_lines(record: logging.LogRecord) -> bool:
    """fpdf2's own line quotes the characters a font lacks (they may spell a child's
    name); _embed logs which scripts instead. This drops fpdf2's (its fallback path)."""
    return not str(record.msg).startswith("Font %s is missing the following glyphs")


logging.getLogger("fpdf.output").addFilter(_no_missing_glyph_lines)


@dataclass(frozen=True)
class Fonts:
    regular: Path
    bold: Path


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


def prepare_fonts(fonts: Fonts, cache_dir: Path) -> Fonts:
    """Subsets of the fonts, written once to `cache_dir`, that load in milliseconds.

    Only what a PDF embeds is kept: fpdf2 drops the layout tables and every name
    record but 0-6 from what it embeds anyway, and each table left out is work saved
    when each document subsets the font again.
    """
    from fontTools import subset

    cache_dir.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(cache_dir)  # what a crash mid-write left
    prepared = []
    for source in (fonts.regular, fonts.bold):
        stat = source.stat()
        target = cache_dir / (f"{source.stem}-{stat.st_size}-{int(stat.st_mtime)}"
                              f"-v{_PREPARED_VERSION}.ttf")
        if not target.exists():
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
    return Fonts(prepared[0], prepared[1])


# -- what is parsed once per process and shared by every document ---------------------------
# Profiled, a standard report spent ~20 % of its time in fpdf2's add_font (fontTools
# parses the TTF, fpdf2 derives widths, cmap and descriptor from it), ~45 % in output()
# subsetting each font again with fontTools and building its CIDToGIDMap, and most of
# the rest breaking lines, which measures the line so far after every character. Now
# the font is parsed once per file and shared read-only by all documents and by the
# worker threads that render them (each document gets its own copy of only what it
# mutates), the embedded subset is cut from bytes prepared once (_Program), and a
# measure of the line reuses the previous one.

_LOCK = threading.Lock()          # guards _faces and layout's _wording (not the renders)
_CACHE_SIZE = 8                   # fonts and wording files kept; LRU beyond that
_FileKey = tuple[str, int, int, int, int]
_faces: OrderedDict[tuple[str, str], tuple[_FileKey, _Face | None]] = OrderedDict()


def _script(code: int) -> str:
    """The first word of a character's Unicode name ("CJK", "HEBREW", "EMOJI"…)."""
    return unicodedata.name(chr(code), "UNKNOWN").split(" ", 1)[0]


def _file_key(path: Path) -> _FileKey:
    """A file as its content goes: replaced or edited, it is a new key. The inode and
    ctime see a replacement that kept size and mtime (cp -p, rsync -t, tar): ctime
    cannot be set back."""
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    cache[key] = value
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


# TTFFont's attributes in the fpdf2 versions this module was checked against. Any other
# set means fpdf2 changed what a font holds, and documents fall back to add_font (slow,
# but never a font object half shared).
_KNOWN_SLOTS = frozenset({
    "i", "type", "name", "desc", "glyph_ids", "_hbfont", "sp", "ss", "up", "ut", "cw",
    "ttffile", "fontkey", "emphasis", "scale", "subset", "cmap", "ttfont", "missing_glyphs",
    "biggest_size_pt", "color_font", "unicode_range", "palette_index", "is_compressed",
    "is_cff", "is_cid_keyed", "is_symbol", "cff_ros", "collection_font_number"})
# What a document changes (or fpdf2's output() does): never shared, made anew per document.
_PER_DOCUMENT = frozenset({"i", "desc", "cw", "subset", "ttfont", "missing_glyphs",
                           "biggest_size_pt", "_hbfont", "color_font"})


def _checksum(data: bytes) -> int:
    """The TrueType table checksum: the sum of the big-endian 32-bit words, padded."""
    data += b"\0" * (-len(data) % 4)
    words: tuple[int, ...] = struct.unpack(f">{len(data) // 4}L", data)
    return sum(words) & 0xFFFFFFFF


class _Program:
    """A TrueType font split once into what each document's embedded subset is made of.

    fontTools' subsetter (what fpdf2's output() runs for every font of every document)
    decompiles and recompiles every table; a document needs only the outlines of the
    glyphs it uses. So the subset here keeps the glyph ids and every other table as the
    file has them, and empties the outlines of the glyphs not used: rewriting `glyf` and
    `loca` is all there is to do, which takes well under a millisecond.
    """

    def __init__(self, data: bytes) -> None:
        version, count = struct.unpack_from(">4sH", data, 0)
        if version not in (b"\0\1\0\0", b"true"):
            raise ValueError("not a TrueType (glyf) font")
        self.tables: dict[bytes, bytes] = {}
        for i in range(count):
            tag, _, offset, length = struct.unpack_from(">4sLLL", data, 12 + 16 * i)
            self.tables[tag] = data[offset:offset + length]
        head = self.tables[b"head"]
        glyph_count = struct.unpack_from(">H", self.tables[b"maxp"], 4)[0]
        loca = self.tables[b"loca"]
        if struct.unpack_from(">h", head, 50)[0] == 0:  # short offsets, in words
            offsets = [2 * o for o in struct.unpack_from(f">{glyph_count + 1}H", loca)]
        else:
            offsets = list(struct.unpack_from(f">{glyph_count + 1}L", loca))
        glyf = self.tables[b"glyf"]
        self.outlines = [glyf[offsets[g]:offsets[g + 1]] for g in range(glyph_count)]
        self.components = [tuple(g for g in self._components(outline) if g < glyph_count)
                           for outline in self.outlines]
        # head with long loca offsets; its checkSumAdjustment is set per document.
        self.head = head[:8] + b"\0\0\0\0" + head[12:50] + struct.pack(">h", 1) + head[52:]
        self.kept = {tag: (table, _checksum(table)) for tag, table in self.tables.items()
                     if tag not in (b"glyf", b"loca", b"head")}

    @staticmethod
    def _components(outline: bytes) -> tuple[int, ...]:
        """The glyphs a composite glyph is drawn from (an accented letter: base + accent)."""
        if len(outline) < 10 or struct.unpack_from(">h", outline, 0)[0] >= 0:
            return ()
        found, pos, more = [], 10, True
        while more:
            flags, glyph = struct.unpack_from(">HH", outline, pos)
            found.append(glyph)
            pos += 4 + (4 if flags & 0x0001 else 2)       # ARG_1_AND_2_ARE_WORDS
            pos += 2 if flags & 0x0008 else 4 if flags & 0x0040 else 8 if flags & 0x0080 else 0
            more = bool(flags & 0x0020)                   # MORE_COMPONENTS
        return tuple(found)

    def subset(self, glyphs: set[int]) -> bytes:
        """The font with the outlines of `glyphs` (and of what they are composed of) only."""
        keep, todo = {0}, [g for g in glyphs if 0 <= g < len(self.outlines)]
        while todo:
            glyph = todo.pop()
            if glyph not in keep:
                keep.add(glyph)
                todo.extend(self.components[glyph])
        pieces, offsets, at = [], [0], 0
        for glyph, outline in enumerate(self.outlines):
            if glyph in keep and outline:
                outline += b"\0" * (-len(outline) % 4)
                pieces.append(outline)
                at += len(outline)
            offsets.append(at)
        tables = {**{tag: table for tag, (table, _) in self.kept.items()},
                  b"glyf": b"".join(pieces), b"head": self.head,
                  b"loca": struct.pack(f">{len(offsets)}L", *offsets)}
        # The table directory, then the tables, each at a multiple of 4 bytes.
        tags = sorted(tables)
        power = 1 << (len(tags).bit_length() - 1)
        header = struct.pack(">LHHHH", 0x00010000, len(tags), power * 16,
                             power.bit_length() - 1, len(tags) * 16 - power * 16)
        directory, body, offset, head_at = [], [], 12 + 16 * len(tags), 0
        for tag in tags:
            table = tables[tag]
            known = self.kept.get(tag)
            checksum = known[1] if known and known[0] is table else _checksum(table)
            directory.append(struct.pack(">4sLLL", tag, checksum, offset, len(table)))
            if tag == b"head":
                head_at = offset
            padded = table + b"\0" * (-len(table) % 4)
            body.append(padded)
            offset += len(padded)
        font = bytearray(header + b"".join(directory) + b"".join(body))
        # head.checkSumAdjustment makes the whole file sum to 0xB1B0AFBA.
        adjustment = (0xB1B0AFBA - _checksum(bytes(font))) & 0xFFFFFFFF
        struct.pack_into(">L", font, head_at + 8, adjustment)
        return bytes(font)


@dataclass(frozen=True)
class _Face:
    """One TTF as fpdf2 sees it, parsed once: nothing here is ever mutated."""

    template: TTFFont                 # read for its shared attributes; never in a document
    data: bytes                       # the file, for each document's own fontTools object
    glyph_order: tuple[str, ...]      # what fontTools would derive from cmap each time
    widths: dict[str, int]            # character -> advance (1/1000 em), for line breaking
    default_width: int                # of a character the font lacks (.notdef)
    program: _Program                 # what each document's embedded subset is cut from


def _shareable(font: TTFFont) -> bool:
    return (frozenset(TTFFont.__slots__) == _KNOWN_SLOTS and type(font) is TTFFont
            and font.color_font is None and not font.is_cff and not font.is_compressed
            and not font.is_symbol)


def _face(path: Path, style: str) -> _Face | None:
    """The parsed font at `path`, from the cache or parsed now; None if fpdf2 is one this
    module does not know how to share a font with."""
    key = (str(path), style)  # the style is part of what fpdf2 derives
    with _LOCK:
        found = _faces.get(key)
        if found is not None:
            _faces.move_to_end(key)
    try:
        version = _file_key(path)
    except FileNotFoundError:
        # The prepared subset lives in the temp directory, which a cleaner may empty under
        # a long-running reactor: what was parsed from it stays good.
        if found is None:
            raise
        return found[1]
    if found is not None and found[0] == version:
        return found[1]
    # Parsed outside the lock: two threads may both parse a new font once, harmlessly.
    data = path.read_bytes()
    probe = FPDF()
    probe.add_font("DejaVu", style, str(path))
    template = next(iter(probe.fonts.values()))
    face = None  # remembered too: a font this module cannot share is not probed again
    if isinstance(template, TTFFont) and _shareable(template):
        with contextlib.suppress(ValueError, KeyError, struct.error):  # not plain TrueType
            face = _shared_face(template, data)
    with _LOCK:
        _remember(_faces, key, (version, face))
    return face


def _shared_face(template: TTFFont, data: bytes) -> _Face:
    program = _Program(data)
    glyph_order = tuple(template.ttfont.getGlyphOrder())
    template.ttfont.close()
    return _Face(template, data, glyph_order,
                 {chr(code): int(width) for code, width in template.cw.items()},
                 int(template.desc.missing_width), program)


class _SharedFont(TTFFont):
    """A document's font built from a shared `_Face`: its own subset, widths, descriptor
    and fontTools object (which output() subsets in place), the rest shared read-only."""

    __slots__ = ("_default_width", "_line", "_line_width", "_program", "_widths")
    _default_width: int
    _line: str            # the last text of more than one character measured, and its
    _line_width: int      # width: fpdf2 measures the line so far after every character
    _program: _Program
    _widths: dict[str, int]

    def get_text_width(self, text: str, font_size_pt: float,
                       text_shaping_params: dict[str, Any] | None) -> tuple[int, float]:
        """fpdf2's sum of the advances, but in C and, for the line being broken (measured
        again after each character it gets), from the last measure plus one character.
        The sum is of integers, so the result is exactly fpdf2's."""
        if text_shaping_params:
            return super().get_text_width(text, font_size_pt, text_shaping_params)
        if font_size_pt > self.biggest_size_pt:
            self.biggest_size_pt = font_size_pt
        line = self._line
        if len(text) == len(line) + 1 and text.startswith(line):
            width = self._line_width + self._widths.get(text[-1], self._default_width)
        elif text == line:
            width = self._line_width
        else:
            try:
                width = sum(map(self._widths.__getitem__, text))
            except KeyError:  # a character the font lacks: fpdf2 draws .notdef, as wide
                width = sum(self._widths.get(c, self._default_width) for c in text)
        if len(text) > 1:
            self._line, self._line_width = text, width
        return len(text), width * font_size_pt * 0.001


def _add_font(pdf: FPDF, family: str, style: str, path: Path) -> None:
    """`pdf.add_font(family, style, path)` without parsing the font again."""
    face = _face(path, style)
    if face is None:
        pdf.add_font(family, style, str(path))
        return
    font = _SharedFont.__new__(_SharedFont)
    template = face.template
    for name in _KNOWN_SLOTS - _PER_DOCUMENT:
        if hasattr(template, name):
            setattr(font, name, getattr(template, name))
    font.fontkey = f"{family.lower()}{style}"
    font.i = len(pdf.fonts) + 1
    font.desc = copy.copy(template.desc)   # output() names and numbers it
    font.cw = copy.copy(template.cw)       # a defaultdict: a lookup may add to it
    font.missing_glyphs = []
    font.biggest_size_pt = 0
    font._hbfont = None
    font.color_font = None
    # Lazy: only the table directory is read here; output() reads what it subsets.
    # Bounding boxes are kept as the font has them (the glyphs are not changed).
    font.ttfont = ttLib.TTFont(io.BytesIO(face.data), lazy=True, recalcTimestamp=False,
                               recalcBBoxes=False)
    font.ttfont.setGlyphOrder(list(face.glyph_order))
    font._widths = face.widths
    font._default_width = face.default_width
    font._program = face.program
    font._line, font._line_width = "", 0
    font.subset = SubsetMap(font)
    pdf.fonts[font.fontkey] = font


def _utf16_hex(code: int) -> str:
    return code.to_bytes(4, "big").decode("utf-32-be").encode("utf-16-be").hex().upper()


class _Producer(OutputProducer):
    """fpdf2's output, with the shared fonts embedded from their `_Program`.

    The PDF objects are those fpdf2 makes for a TrueType font (Type0 font, CIDFontType2,
    descriptor, ToUnicode CMap, CIDToGIDMap, FontFile2); only the font program differs:
    glyph ids as in the file instead of renumbered, so CIDToGIDMap maps to those.
    """

    def _add_fonts(self, image_objects_per_index: Any, gfxstate_objs_per_name: Any,
                   pattern_objs_per_name: Any) -> dict[int, PDFFont | PDFType3Font]:
        fonts = self.fpdf.fonts
        ours = [f for f in fonts.values() if isinstance(f, _SharedFont)]
        if self.fpdf._compliance or not ours:  # PDF/A wants more (CIDSet): fpdf2's way
            return super()._add_fonts(image_objects_per_index, gfxstate_objs_per_name,
                                      pattern_objs_per_name)
        registered = dict(fonts)  # fpdf2 embeds the others (none in a report) its way
        for key in [k for k, f in registered.items() if isinstance(f, _SharedFont)]:
            del fonts[key]
        try:
            objects = super()._add_fonts(image_objects_per_index, gfxstate_objs_per_name,
                                         pattern_objs_per_name)
        finally:
            fonts.clear()
            fonts.update(registered)
        for font in sorted(ours, key=lambda f: f.i):
            objects[font.i] = self._embed(font)
        return objects

    def _embed(self, font: _SharedFont) -> PDFFont:
        fontname = f"MPDFAA+{font.name}"
        used = [(glyph, code) for glyph, code in font.subset.items() if glyph is not None]
        if font.missing_glyphs:
            # Which scripts, not which characters: they may spell a child's name.
            log.warning("report font lacks characters, drawn as boxes", font=font.name,
                        count=len(font.missing_glyphs),
                        scripts=sorted({_script(c) for c in font.missing_glyphs}))
        composite = PDFFont(subtype="Type0", base_font=fontname, encoding="Identity-H")
        self._add_pdf_obj(composite, "fonts")
        cid_font = PDFFont(subtype="CIDFontType2", base_font=fontname,
                           d_w=font.desc.missing_width, w=_tt_font_widths(font))
        self._add_pdf_obj(cid_font, "fonts")
        composite.descendant_fonts = PDFArray([cid_font])
        # ToUnicode: what text extraction and search read, exactly as fpdf2 writes it.
        bf_char = [f"<{code:04X}> <{''.join(map(_utf16_hex, glyph.unicode))}>\n"
                   for glyph, code in used if isinstance(glyph.unicode, tuple) and glyph.unicode]
        to_unicode = PDFContentStream((
            "/CIDInit /ProcSet findresource begin\n12 dict begin\nbegincmap\n"
            "/CIDSystemInfo\n<</Registry (Adobe)\n/Ordering (UCS)\n/Supplement 0\n>> def\n"
            "/CMapName /Adobe-Identity-UCS def\n/CMapType 2 def\n"
            "1 begincodespacerange\n<0000> <FFFF>\nendcodespacerange\n"
            f"{_build_cmap_blocks(bf_char, 'bfchar')}"
            "endcmap\nCMapName currentdict /CMap defineresource pop\nend\nend"
        ).encode("latin-1"))
        self._add_pdf_obj(to_unicode, "fonts")
        composite.to_unicode = to_unicode
        system_info = CIDSystemInfo()
        self._add_pdf_obj(system_info, "fonts")
        cid_font.c_i_d_system_info = system_info
        descriptor = font.desc
        descriptor.font_name = Name(fontname)
        self._add_pdf_obj(descriptor, "fonts")
        cid_font.font_descriptor = descriptor
        # Up to the highest code used (fpdf2 writes all 65,536 entries, 128 KiB to compress
        # per font for the few dozen a report uses): every code in the text is mapped.
        cid_to_gid = bytearray(2 * (max((code for _, code in used), default=0) + 1))
        for glyph, code in used:
            cid_to_gid[2 * code:2 * code + 2] = glyph.glyph_id.to_bytes(2, "big")
        gid_map = PDFContentStream(contents=bytes(cid_to_gid), compress=True)
        self._add_pdf_obj(gid_map, "fonts")
        cid_font.c_i_d_to_g_i_d_map = gid_map
        program = PDFFontStream(font._program.subset({glyph.glyph_id for glyph, _ in used}))
        self._add_pdf_obj(program, "fonts")
        descriptor.font_file2 = program  # type: ignore[attr-defined]
        font.subset.pick.cache_clear()   # what fpdf2 does after embedding a font
        font.subset.get_glyph.cache_clear()
        font.close()
        return composite
