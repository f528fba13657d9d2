"""Which language and script a text is in: the checks behind `clean.language`.

py3langid's model ships inside the package, so identification works offline.
"""

from __future__ import annotations

import functools
from typing import Any


def latin_share(text: str) -> float:
    """Give back the share of letters in Latin script (1.0 for text without letters)."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 1.0
    latin = sum(1 for ch in letters if ch < "\u0250" or "\u1e00" <= ch <= "\u1eff")
    return latin / len(letters)


@functools.cache
def _language_identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_codes() -> set[str]:
    """The ISO 639-1 codes the language identifier can name."""
    return set(_language_identifier().nb_classes)


def identify_language(text: str, sample_chars: int = 1000) -> tuple[str, float]:
    """Give back (ISO 639-1 code, probability) from py3langid's model, which ships inside the package."""
    # the first thousand characters name the language as surely as a whole article, at a fraction of the cost
    language, confidence = _language_identifier().classify(text[:sample_chars])
    return str(language), float(confidence)
