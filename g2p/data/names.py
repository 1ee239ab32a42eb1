"""Names and identifiers in the conventions of the real BIOSCAN-5M metadata.

The synthesiser writes what a reader of the real CSV expects to see:

- taxon names: real insect order names first (``Diptera``, ``Hymenoptera`` ...),
  then Latin-looking family (``-idae``), subfamily (``-inae``) and genus names
  built from syllables; seen species get a binomial (``Genus epithet``), held-out
  species a placeholder (``Genus sp. 4ZKM``) of the kind BIOSCAN-5M's own
  partitioning (``find_novel_species``: a ``sp.``, a digit, two capitals) marks
  as "not a scientific name";
- ``dna_bin``: ``BOLD:`` + three capitals + four digits, one per species;
- ``processid``: a BOLD project code (4-5 capitals) + a running number + ``-YY``;
- ``sampleid``: a plate (``BIOUG12345`` or ``CBG-A12345``) + ``-`` + a 96-well
  position (``A01`` .. ``H12``);
- places: a table of collection regions (country, province/state, centroid)
  like those in the BIOSCAN sample; a record is labelled with the region
  nearest to its coordinates.

Everything takes an explicit ``numpy.random.Generator`` so the same seed gives
the same names.
"""

from __future__ import annotations

import numpy as np

ORDER_NAMES: tuple[str, ...] = (
    "Diptera", "Hymenoptera", "Coleoptera", "Lepidoptera", "Hemiptera", "Trichoptera",
    "Psocodea", "Thysanoptera", "Orthoptera", "Neuroptera", "Ephemeroptera", "Plecoptera",
    "Odonata", "Blattodea", "Dermaptera", "Mecoptera", "Raphidioptera", "Megaloptera",
    "Strepsiptera", "Mantodea", "Embioptera", "Phasmida", "Zoraptera", "Archaeognatha",
)

_ONSETS = ("b", "c", "d", "g", "l", "m", "n", "p", "r", "s", "t", "v", "ch", "ph", "th", "tr",
           "cr", "pl", "st", "x", "z", "h")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "y")
_CODAS = ("", "", "", "n", "r", "s", "l", "m", "x")
_EPITHET_ENDS = ("us", "a", "um", "is", "ensis", "ella", "ata", "oides", "ii", "ica")

# (country, province_state or "" when the real data leaves it empty, lat, lon)
SITES: tuple[tuple[str, str, float, float], ...] = (
    ("Canada", "Ontario", 43.55, -80.25), ("Canada", "British Columbia", 54.77, -127.11),
    ("Canada", "Quebec", 46.81, -71.21), ("Canada", "Alberta", 53.54, -113.49),
    ("Canada", "Nova Scotia", 44.65, -63.58), ("Canada", "Yukon Territory", 60.72, -135.06),
    ("United States", "California", 37.97, -122.73), ("United States", "Texas", 30.27, -97.74),
    ("United States", "Florida", 27.99, -81.76), ("United States", "Maine", 45.25, -69.45),
    ("Mexico", "Veracruz", 20.03, -97.11), ("Costa Rica", "Guanacaste", 10.84, -85.61),
    ("Costa Rica", "Puntarenas", 9.02, -83.00), ("Colombia", "Huila", 3.07, -75.38),
    ("Ecuador", "Pichincha", 0.02, -78.50), ("Peru", "Cuzco", -12.89, -71.41),
    ("Suriname", "Paramaribo", 5.82, -55.22), ("Brazil", "Amazonas", -3.12, -60.02),
    ("Argentina", "Jujuy", -23.76, -64.85), ("Chile", "Los Lagos", -41.47, -72.94),
    ("Finland", "", 68.98, 20.94), ("Sweden", "", 59.88, 17.33),
    ("Norway", "Nordland", 66.49, 12.96), ("Germany", "Bavaria", 48.14, 11.58),
    ("Portugal", "Braganca", 41.49, -6.52), ("Lebanon", "", 34.40, 35.81),
    ("Egypt", "Qalyubia", 30.25, 31.55), ("Ghana", "Volta", 6.21, 0.44),
    ("Kenya", "Nairobi", -1.29, 36.82), ("Tanzania", "Simiyu", -2.25, 33.82),
    ("South Africa", "KwaZulu-Natal", -29.61, 30.35), ("South Africa", "Western Cape", -33.93, 18.42),
    ("Madagascar", "Analamanga", -18.88, 47.51), ("Pakistan", "Azad Kashmir", 33.85, 73.77),
    ("Bangladesh", "Chittagong", 22.65, 91.67), ("Thailand", "Nakhon Ratchasima", 14.50, 101.93),
    ("Vietnam", "Ninh Binh", 20.35, 105.59), ("Malaysia", "Sabah", 5.98, 116.07),
    ("Philippines", "Lanao del Norte", 8.19, 124.19), ("Papua New Guinea", "Morobe", -6.73, 146.99),
    ("Australia", "Western Australia", -35.02, 117.23), ("Australia", "Queensland", -19.26, 146.82),
    ("New Zealand", "Nelson", -41.31, 173.29),
)
SITE_LATLON = np.array([[s[2], s[3]] for s in SITES], dtype=np.float64)  # (n_sites, 2)


def _word(rng: np.random.Generator, n_syll: int) -> str:
    parts = []
    for _ in range(n_syll):
        parts.append(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                     + _CODAS[rng.integers(len(_CODAS))])
    return "".join(parts)


def unique_words(rng: np.random.Generator, n: int, suffix: str = "", taken: set[str] | None = None,
                 capitalise: bool = True) -> list[str]:
    """``n`` distinct pseudo-Latin words (3 letters or more before ``suffix``)."""
    taken = set() if taken is None else taken
    out: list[str] = []
    n_syll = 2
    misses = 0
    while len(out) < n:
        stem = _word(rng, n_syll)
        w = (stem.capitalize() if capitalise else stem) + suffix
        if len(stem) < 5 or w in taken:
            misses += 1
            if misses > 20:  # the two-syllable space is filling up: lengthen
                n_syll, misses = n_syll + 1, 0
            continue
        taken.add(w)
        out.append(w)
    return out


def order_names(rng: np.random.Generator, n: int) -> list[str]:
    """Real order names while they last, then invented ``-ptera`` ones."""
    names = list(ORDER_NAMES[:n])
    if n > len(names):
        names += unique_words(rng, n - len(names), suffix="ptera", taken=set(names))
    return names


def species_epithets(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct lower-case epithets (``obscurella``): scientific-name style."""
    taken: set[str] = set()
    out = []
    while len(out) < n:
        w = _word(rng, 2) + _EPITHET_ENDS[rng.integers(len(_EPITHET_ENDS))]
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


_CAPS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


def placeholder_codes(rng: np.random.Generator, n: int) -> list[str]:
    """Interim-name codes like ``4ZKM``: a digit and capitals, as BOLD interim names use."""
    taken: set[str] = set()
    out = []
    while len(out) < n:
        code = str(rng.integers(1, 10)) + "".join(rng.choice(_CAPS, 3))
        if code not in taken:
            taken.add(code)
            out.append(code)
    return out


def bin_codes(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct Barcode Index Numbers, ``BOLD:ABC1234``."""
    taken: set[str] = set()
    out = []
    while len(out) < n:
        code = "BOLD:A" + "".join(rng.choice(_CAPS, 2)) + f"{rng.integers(0, 10000):04d}"
        if code not in taken:
            taken.add(code)
            out.append(code)
    return out


def project_codes(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray]:
    """``n`` distinct BOLD project codes (``GMMVA``) and each project's two-digit year."""
    taken: set[str] = set()
    codes = []
    while len(codes) < n:
        code = "".join(rng.choice(_CAPS, int(rng.integers(4, 6))))
        if code not in taken:
            taken.add(code)
            codes.append(code)
    years = rng.integers(19, 24, size=n)
    return codes, years


def sampleid_parts(plate: np.ndarray, well: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prefix index (0 ``BIOUG``, 1 ``CBG-A``) and the ``12345-A01`` tail for plates and wells."""
    rows = np.array(list("ABCDEFGH"))
    prefix = (plate % 3 == 0).astype(np.int8)  # a third of the plates under the newer CBG prefix
    tail = np.char.add(np.char.add(plate.astype(str), "-"),
                       np.char.add(rows[well // 12], np.char.zfill((well % 12 + 1).astype(str), 2)))
    return prefix, tail


def nearest_site(lat: np.ndarray, lon: np.ndarray, block: int = 262_144) -> np.ndarray:
    """Index into :data:`SITES` of the region nearest each point (equirectangular metric).

    Works in blocks so that 5 M points never hold more than a few (block, n_sites) arrays.
    """
    lat = np.asarray(lat, dtype=np.float32)
    lon = np.asarray(lon, dtype=np.float32)
    sites = SITE_LATLON.astype(np.float32)
    out = np.empty(lat.shape[0], dtype=np.int16)
    for i in range(0, lat.shape[0], block):
        la, lo = lat[i: i + block, None], lon[i: i + block, None]
        dlat = la - sites[None, :, 0]
        dlon = (lo - sites[None, :, 1] + 180.0) % 360.0 - 180.0
        dlon *= np.cos(np.deg2rad(la))
        out[i: i + block] = np.argmin(dlat * dlat + dlon * dlon, axis=1)
    return out
