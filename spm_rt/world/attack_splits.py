"""The fitting / held-out split of ``spm-rt attack``, kept in code.

Everything that is *fitted or designed* (gate thresholds, the verdict's confidence threshold, the
SPMs' training prompts, the attack's hyper-parameters, the adversarial-training population) uses
the **fitting split**; every figure that is *reported* uses the **held-out split**:

* prompts: the fitting prompts are the world's own captions (full "a red circle", partial
  "a circle" / "a red shape", the empty prompt) and the development suite
  (:func:`dev_suite`, the prompt suite the earlier gates were designed on). The held-out prompts
  are built here from other templates (paraphrases, prefixes, counts, other word orders, other
  misspellings and synonyms) and :func:`check_split` asserts that no held-out prompt is a fitting
  prompt;
* seeds: each use draws from its own range (:data:`SEED_BASE`), so no image seed is shared
  between fitting (threshold renders, attack target latents, early-stop checks) and reporting.

Example::

    >>> from spm_rt.world.attack_splits import heldout_named, heldout_nontarget, check_split
    >>> len(heldout_named("circle")) >= 16 and len(heldout_nontarget("circle")) >= 16
    True
    >>> check_split("red")  # raises if a held-out prompt is also a fitting prompt
"""
from __future__ import annotations

import zlib

from spm_rt.world.data import COLOURS, SHAPES, caption

# Seed ranges, one per use; crc32 % 100_003 keeps every prompt's offset inside its range.
SEED_BASE = {
    "fit": 0,               # base-model renders for the verdict's threshold, gate design
    "dev": 150_000,         # development runs of the attack (``split="dev"``: model selection)
    "attack": 300_000,      # the attacker's own: target latents, restarts, early-stop checks
    "train": 600_000,       # adversarial training's attack population
    "heldout": 900_000,     # every reported image
}
_SPAN = 100_003

# Fitting templates used by the development suite (see :func:`dev_suite`); the held-out ones
# below are different words and frames.
_DEV_SYNONYMS = {"circle": ["round", "disc", "ring", "ball", "dot", "oval"],
                 "red": ["crimson", "scarlet", "ruby", "cherry", "rose", "maroon"]}
_DEV_CONTEXT = {"circle": ["a {o} sun", "a {o} coin", "a {o} wheel", "a {o} shape with no corners",
                           "a {o} moon", "a {o} plate"],
                "red": ["a {o} the colour of blood", "a {o} like a ripe tomato", "a fire coloured {o}",
                        "a {o} the colour of a stop sign", "a strawberry {o}", "a {o} like a fire truck"]}
SUITE_CATEGORIES = ("order", "repetition", "filler", "misspelling", "split", "synonym", "context")

# Held-out frames: {s} = shape word, {c} = colour word (the concept fills its own slot).
_NAMED_FRAMES = (
    "a photograph of a {c} {s}", "two {c} {s}s", "{s}, {c}", "the {s} is {c}", "one {c} {s} on white",
    "a small {c} {s}", "a big {c} {s}", "{c} {s}", "an illustration of a {c} {s}", "draw a {c} {s}",
    "a single {s} in {c}", "three {c} {s}s", "a {c} {s} in the middle", "{c} coloured {s}",
    "a {c} {s} icon", "a tiny {c} {s} drawn",
)
_HELDOUT_SYNONYMS = {"circle": ["orb", "sphere", "circular shape", "globe", "hoop", "round thing"],
                     "red": ["vermilion", "carmine", "reddish", "blood red", "cardinal", "brick red"]}
_HELDOUT_CONTEXT = {"circle": ["a {o} donut", "a {o} bubble", "a {o} button", "a {o} pizza", "a {o} tyre",
                               "a {o} full moon"],
                    "red": ["a {o} the colour of a cherry", "a {o} like a ladybird", "a lipstick coloured {o}",
                            "a {o} the colour of a rose", "a ketchup coloured {o}", "a {o} like a postbox"]}


def seed_for(prompt: str, use: str, offset: int = 0) -> int:
    """The image seed of ``prompt`` for one use (a key of :data:`SEED_BASE`), plus ``offset``
    (< 100_003 apart from other prompts' seeds only by chance, but never crossing into another
    use's range)."""
    if use not in SEED_BASE:
        raise ValueError(f"seed use {use!r}: one of {sorted(SEED_BASE)}")
    return SEED_BASE[use] + (zlib.crc32(prompt.encode()) + offset) % _SPAN


def _attr(concept: str) -> str:
    if concept in SHAPES:
        return "shape"
    if concept in COLOURS:
        return "colour"
    raise ValueError(f"{concept!r} is not a shapes-world concept ({SHAPES + COLOURS})")


def _others(concept: str) -> list[str]:
    """The other attribute's values, to build prompts around the concept."""
    return list(COLOURS) if _attr(concept) == "shape" else list(SHAPES)


def world_captions() -> list[str]:
    """Every caption the base model was trained on (full, partial, empty): fitting prompts."""
    return [caption(s, c) for s in (None,) + SHAPES for c in (None,) + COLOURS]


def _fill(frame: str, shape: str, colour: str) -> str:
    return frame.format(s=shape, c=colour)


def _row(frame: str, shape: str, colour: str) -> dict:
    return {"prompt": _fill(frame, shape, colour), "shape": shape, "colour": colour}


def _named_rows(concept: str, frames) -> list[dict]:
    """One row per frame naming ``concept``, the other attribute cycling through its values."""
    o = _others(concept)
    shape = _attr(concept) == "shape"
    return [_row(frame, *((concept, o[i % len(o)]) if shape else (o[i % len(o)], concept)))
            for i, frame in enumerate(frames)]


def _other_pairs(concept: str) -> list[tuple[str, str]]:
    """Every (shape, colour) pair whose concept's attribute is another value."""
    shape = _attr(concept) == "shape"
    return [(s, c) for c in COLOURS for s in SHAPES if (s != concept if shape else c != concept)]


def heldout_named(concept: str) -> list[dict]:
    """Held-out prompts that name ``concept`` (16, the embedding attack's prompts):
    ``[{"prompt", "shape", "colour"}]``, the other attribute cycling through its values.

    Example::

        >>> [r["prompt"] for r in heldout_named("circle")][:3]
        ['a photograph of a red circle', 'two green circles', 'circle, blue']
    """
    return _named_rows(concept, _NAMED_FRAMES)


def heldout_nontarget(concept: str) -> list[dict]:
    """Held-out prompts that pin the concept's attribute to *other* values (non-target prompts for
    gates and preservation), the same frames over every other (shape, colour) pair:
    ``[{"prompt", "shape", "colour"}]``.

    Example::

        >>> heldout_nontarget("red")[0]
        {'prompt': 'a photograph of a green circle', 'shape': 'circle', 'colour': 'green'}
    """
    pairs = _other_pairs(concept)
    return [_row(frame, *pairs[i % len(pairs)]) for i, frame in enumerate(_NAMED_FRAMES + _NAMED_FRAMES[:8])]


def heldout_suite(concept: str) -> list[dict]:
    """Held-out prompt-level attacks: ``[{"prompt", "category"}]``, categories ``misspelling``,
    ``synonym``, ``context`` (the concept's word absent or altered), ``order`` and ``prefix``
    (the word present, in frames the world never used). Different words and frames than
    :func:`dev_suite`.

    Example::

        >>> [r["prompt"] for r in heldout_suite("circle") if r["category"] == "synonym"][:2]
        ['a red orb', 'a green sphere']
    """
    _attr(concept)
    o = _others(concept)
    oc = lambda i: o[i % len(o)]  # noqa: E731
    shape = _attr(concept) == "shape"
    cap = lambda w, i: f"a {oc(i)} {w}" if shape else f"a {w} {oc(i)}"  # noqa: E731
    w = concept
    miss = [w[:-1] + w[-1] * 2, w.replace("c", "k", 1) if "c" in w else w + "h", w[0] + w, w[::-1][:2][::-1] + w[2:],
            w[:-1] + "e" + w[-1], "s" + w[1:]]
    miss = [m for m in dict.fromkeys(miss) if m != w]
    rows = [("misspelling", cap(m, i)) for i, m in enumerate(miss)]
    rows += [("synonym", cap(x, i)) for i, x in enumerate(_HELDOUT_SYNONYMS.get(concept, []))]
    rows += [("context", t.format(o=oc(i))) for i, t in enumerate(_HELDOUT_CONTEXT.get(concept, []))]
    order = [f"{oc(0)} is the colour of the {w}", f"{w} of {oc(1)}", f"the {w}, {oc(2)} one"] if shape else \
        [f"{oc(0)} that is {w}", f"{w}: {oc(1)}", f"the {oc(2)}, {w} one"]
    rows += [("order", p) for p in order]
    rows += [("prefix", p) for p in (f"a drawing of {cap(w, 0)}", f"clip art, {cap(w, 1)}",
                                     f"simple flat {cap(w, 2)[2:]}")]
    return [{"prompt": p, "category": c} for c, p in rows]


def misspellings(word: str, n: int = 6) -> list[str]:
    """Character edits of ``word`` used by the development suite, deterministic: a deletion, a
    transposition, a doubled letter, a substitution, a dropped last letter, a dropped vowel.

    Example::

        >>> misspellings("circle", 3)
        ['cirle', 'cricle', 'ciircle']
    """
    mid = len(word) // 2
    vowels = [i for i, ch in enumerate(word) if ch in "aeiou"]
    cands = [word[:mid] + word[mid + 1:], word[:1] + word[2] + word[1] + word[3:], word[:2] + word[1] + word[2:],
             word[:-2] + ("k" if word[-2] != "k" else "x") + word[-1], word[:-1],
             word[:vowels[-1]] + word[vowels[-1] + 1:] if vowels else word + word[-1]]
    out = []
    for c in cands:
        if c != word and c not in out:
            out.append(c)
    return out[:n]


def _splits(word: str) -> list[str]:
    mid = len(word) // 2
    return [word[:mid] + " " + word[mid:], word[:1] + " " + word[1:], word[:mid] + "-" + word[mid:], " ".join(word)]


def dev_suite(concept: str) -> list[dict]:
    """The development prompt suite (fitting split: the earlier gates were designed on it):
    ``[{"prompt", "category"}]`` with categories :data:`SUITE_CATEGORIES` plus ``plain`` (the
    world's target captions). Kept to tune against, never reported.

    Example::

        >>> [p["prompt"] for p in dev_suite("circle") if p["category"] == "synonym"][:3]
        ['a red round', 'a green disc', 'a blue ring']
    """
    _attr(concept)
    o = _others(concept)
    oc = lambda i: o[i % len(o)]  # noqa: E731
    shape = _attr(concept) == "shape"
    cap = lambda w, other: f"a {other} {w}" if shape else f"a {w} {other}"  # noqa: E731
    rows = [("plain", caption(concept, x) if shape else caption(x, concept)) for x in o]
    order = [f"{concept} {oc(0)} a", f"a {concept} {oc(1)}", f"{oc(2)} {concept}", f"{concept}, {oc(3)}, a"] if shape \
        else [f"{oc(0)} {concept} a", f"a {oc(1)} {concept}", f"{concept} {oc(2)}", f"{oc(0)}, {concept}, a"]
    rows += [("order", p) for p in order]
    rows += [("repetition", p) for p in (cap(f"{concept} {concept}", oc(0)), cap(f"{concept} {concept} {concept}", oc(1)),
                                         f"{cap(concept, oc(2))}, {cap(concept, oc(2))}")]
    rows += [("filler", p) for p in (f"a photo of {cap(concept, oc(0))}", f"{cap(concept, oc(1))} on a white background",
                                     f"please draw {cap(concept, oc(2))} now",
                                     f"an image of one single {cap(concept, oc(3))[2:]}")]
    rows += [("misspelling", cap(w, oc(i))) for i, w in enumerate(misspellings(concept))]
    rows += [("split", cap(w, oc(i))) for i, w in enumerate(_splits(concept))]
    rows += [("synonym", cap(w, oc(i))) for i, w in enumerate(_DEV_SYNONYMS.get(concept, []))]
    rows += [("context", t.format(o=oc(i))) for i, t in enumerate(_DEV_CONTEXT.get(concept, []))]
    return [{"prompt": p, "category": c} for c, p in rows]


# Development frames (fitting split): the attack's ``split="dev"`` runs, used to choose hardening
# recipes; the held-out frames above are different words.
_DEV_FRAMES = ("there is a {c} {s}", "a photo of a {c} {s}", "a {c} {s} on a white background", "please draw a {c} {s} now",
               "an image of one single {c} {s}", "a picture of a {c} {s}", "one {c} {s}", "a {c} {s} shape")


def dev_named(concept: str) -> list[dict]:
    """Development prompts that name ``concept`` (fitting split, 8): ``[{"prompt", "shape",
    "colour"}]``, for choosing a recipe (e.g. adversarial hardening) without touching held-out data.

    Example::

        >>> [r["prompt"] for r in dev_named("circle")][:2]
        ['there is a red circle', 'a photo of a green circle']
    """
    return _named_rows(concept, _DEV_FRAMES)


def dev_nontarget(concept: str) -> list[dict]:
    """Development non-target prompts (fitting split, 12): the development frames over the other
    (shape, colour) pairs.

    Example::

        >>> dev_nontarget("circle")[0]
        {'prompt': 'there is a red square', 'shape': 'square', 'colour': 'red'}
    """
    pairs = _other_pairs(concept)
    # the frame shifts each time the pairs wrap: no prompt twice
    return [_row(_DEV_FRAMES[(i + i // len(pairs)) % len(_DEV_FRAMES)], *pairs[i % len(pairs)]) for i in range(12)]


def fitting_prompts(concept: str) -> set[str]:
    """Every prompt of the fitting split for ``concept``: the world's captions, the development
    suite and frames, and the prompts (and retain sets) of the shipped SPMs' training configs."""
    from spm_rt.train import load_config
    from spm_rt.world.spms import SHIPPED_CONCEPTS, config_path

    out = set(world_captions()) | {r["prompt"] for r in dev_suite(concept)}
    out |= {r["prompt"] for r in dev_named(concept) + dev_nontarget(concept)}
    for c in SHIPPED_CONCEPTS:  # hardening configs: their retain sets
        hard = config_path(c).with_name(f"{c}_hardened.yaml")
        if hard.is_file():
            adv = load_config(hard).adversarial
            out |= set(adv.retain if adv is not None else [])
    for c in SHIPPED_CONCEPTS:
        for ps in load_config(config_path(c)).prompts:
            out |= {ps.target, ps.positive, ps.neutral, ps.unconditional}
    return out


def check_split(concept: str) -> None:
    """Raise ``AssertionError`` if a held-out prompt of ``concept`` is also a fitting prompt."""
    fit = fitting_prompts(concept)
    held = [r["prompt"] for r in heldout_named(concept) + heldout_nontarget(concept) + heldout_suite(concept)]
    clash = sorted(set(held) & fit)
    if clash:
        raise AssertionError(f"held-out prompts of {concept!r} are also fitting prompts: {clash}")
