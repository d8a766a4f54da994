"""Instruction questions about synthetic slides, each answerable from the ground truth.

Families and the evidence they need:

==================  ==============  ========  =================================================
template            metadata        kind      needs
==================  ==============  ========  =================================================
``diagnosis``       Classification  4 choice  slide: which lesion (epithelioid vs spindle: cells)
``presence``        Morphology      2 choice  slide: is class X anywhere
``tissue_types``    Morphology      open      slide: every class present
``location``        Location        4 choice  region: where the one region of class X is
``nuclear_shape``   Morphology      2 choice  cell: round or spindle nuclei in the neoplasm
``describe_region`` Morphology      open      region: the class and look of one region
``caption``         Caption         open      slide
``report``          Report          open      slide
==================  ==============  ========  =================================================

Closed questions are multiple choice, options inline (``"... A) x B) y"``) and the answer
``"B) y"``. :class:`LetterBalancer` puts the correct option at each letter equally often per
template over a dataset (within one), so always answering "A" scores exactly chance.
Localisable questions (the finding in exactly one region of a slide of at least 4) carry an
``evidence_target``: the region id and tissue outline the answer rests on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import shapely
from shapely.geometry import mapping

from omero_hwsi.synthetic.classes import CLASS_NAMES, LESION_CLASSES, SHAPE_PAIR, TISSUE_CLASSES
from omero_hwsi.synthetic.pathology import RegionTruth, SlideTruth
from omero_hwsi.synthetic.texts import (
    NO_TUMOUR,
    caption,
    diagnosis,
    join_words,
    ordered_classes,
    region_sentence,
    report,
)

__all__ = [
    "LETTERS",
    "TEMPLATES",
    "LetterBalancer",
    "Question",
    "evidence_target",
    "slide_questions",
]

LETTERS = "ABCD"
Family = Literal["Classification", "Morphology", "Location", "Caption", "Report"]

TEMPLATES: dict[str, tuple[Family, tuple[str, ...]]] = {
    "diagnosis": ("Classification", (
        "What is the diagnosis?",
        "Which diagnosis best fits this slide?",
    )),
    "presence": ("Morphology", (
        "Is there {label} on this slide?",
        "Does this slide show {label}?",
    )),
    "tissue_types": ("Morphology", (
        "Which tissue types are present on this slide?",
        "List the kinds of tissue seen in this slide.",
    )),
    "location": ("Location", (
        "Where is the {label}?",
        "In which part of the slide is the {label}?",
    )),
    "nuclear_shape": ("Morphology", (
        "Are the nuclei of the neoplasm round or spindle-shaped?",
        "What shape are the nuclei of the neoplastic cells?",
    )),
    "describe_region": ("Morphology", (
        "Describe the tissue in the {location} region.",
        "What does the {location} region show?",
    )),
    "caption": ("Caption", (
        "Write a short caption for this slide.",
        "Give a one-line caption of this whole slide image.",
    )),
    "report": ("Report", (
        "Write a pathology report for this slide.",
        "Describe the findings of this slide as a pathology report.",
    )),
}
"""Template id -> (task family, question wordings)."""

DIAGNOSES: tuple[str, ...] = tuple(TISSUE_CLASSES[c].label for c in LESION_CLASSES) + (NO_TUMOUR,)
"""The options of the diagnosis question (lesion labels and no tumour)."""

_SHAPE_OPTIONS = ("round", "spindle-shaped")


@dataclass(frozen=True, slots=True)
class Question:
    """One question about one slide.

    Attributes:
        template: Template id (a key of :data:`TEMPLATES`).
        metadata: Task family written to the test file's ``metadata``.
        question: Full question text, options included for closed ones.
        answer: Reference answer (``"B) stroma"`` for closed ones).
        options: The options in letter order (empty for open questions).
        correct: Index of the correct option, or -1 for open questions.
        regions: Region ids the answer rests on (empty when not localisable).
    """

    template: str
    metadata: str
    question: str
    answer: str
    options: tuple[str, ...] = ()
    correct: int = -1
    regions: tuple[str, ...] = field(default_factory=tuple)


class LetterBalancer:
    """Where each template's correct option goes: every letter equally often (within one).

    Positions come in shuffled blocks of ``n`` per ``(template, n)``: each block uses every
    position once, so counts never differ by more than one, and within a block the order
    is random (seeded) rather than a guessable A, B, C, D cycle. The same balancer keeps
    yes/no answers balanced per subject (:meth:`take_turn`).
    """

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1E77E5]))
        self._blocks: dict[tuple[str, int], list[int]] = {}
        self._answers: Counter[tuple[str, bool]] = Counter()

    def take_turn(self, key: str, answer: bool) -> bool:
        """Whether a yes/no question about ``key`` with this ``answer`` may be asked now.

        It may when the answer has come up no more often than its opposite for ``key``; the
        question is then counted. Over a dataset each key's yes and no counts stay within
        one, so no key (a tissue class, say) predicts its answer: a blind model cannot learn
        "stroma -> yes" from how common stroma is.
        """
        if self._answers[key, answer] > self._answers[key, not answer]:
            return False
        self._answers[key, answer] += 1
        return True

    def position(self, template: str, n: int) -> int:
        """The next correct position (0-based) of ``template`` with ``n`` options."""
        block = self._blocks.setdefault((template, n), [])
        if not block:
            block.extend(int(i) for i in self._rng.permutation(n))
        return block.pop()

    def arrange(
        self, template: str, correct: str, distractors: list[str]
    ) -> tuple[tuple[str, ...], int]:
        """Options with ``correct`` at the balanced position, distractors shuffled around it."""
        n = len(distractors) + 1
        at = self.position(template, n)
        order = [distractors[int(i)] for i in self._rng.permutation(len(distractors))]
        order.insert(at, correct)
        return tuple(order), at

    @property
    def rng(self) -> np.random.Generator:
        """The balancer's generator, for the choices made alongside it."""
        return self._rng


def _closed(
    template: str, wording: str, correct: str, distractors: list[str], balancer: LetterBalancer,
    regions: tuple[str, ...] = (),
) -> Question:
    options, at = balancer.arrange(template, correct, distractors)
    listed = " ".join(f"{LETTERS[k]}) {o}" for k, o in enumerate(options))
    return Question(
        template=template,
        metadata=TEMPLATES[template][0],
        question=f"{wording} {listed}",
        answer=f"{LETTERS[at]}) {correct}",
        options=options,
        correct=at,
        regions=regions,
    )


def _open(template: str, wording: str, answer: str, regions: tuple[str, ...] = ()) -> Question:
    return Question(template, TEMPLATES[template][0], wording, answer, regions=regions)


def _wording(template: str, rng: np.random.Generator, **values: str) -> str:
    variants = TEMPLATES[template][1]
    return variants[int(rng.integers(len(variants)))].format(**values)


def _ids(regions: tuple[RegionTruth, ...]) -> tuple[str, ...]:
    return tuple(r.hid for r in regions)


def slide_questions(truth: SlideTruth, balancer: LetterBalancer) -> list[Question]:
    """Every question family that applies to the slide, in :data:`TEMPLATES` order.

    ``location`` needs at least 4 regions; it is asked for every class that lies in exactly one
    of them;
    ``nuclear_shape`` needs the slide's only lesion class to be one of the shape pair; ``diagnosis`` needs at most
    one lesion class. The rest always apply.
    """
    rng = balancer.rng
    present = truth.classes_present()
    lesions = [c for c in present if c in LESION_CLASSES]
    out: list[Question] = []

    if len(lesions) <= 1:
        correct = diagnosis(truth)
        distractors = [d for d in DIAGNOSES if d != correct]
        regions = _ids(truth.regions_of(lesions[0])) if lesions else ()
        out.append(_closed("diagnosis", _wording("diagnosis", rng), correct, distractors,
                           balancer, regions))

    # A presence question for every class whose yes/no turn it is: each class is asked as
    # often with "yes" as with "no" over the dataset (within one), so neither the answer nor
    # the class alone tells the answer.
    for k in rng.permutation(len(CLASS_NAMES)):
        name = CLASS_NAMES[int(k)]
        yes = name in present
        if not balancer.take_turn(f"presence/{name}", yes):
            continue
        out.append(_closed(
            "presence", _wording("presence", rng, label=TISSUE_CLASSES[name].label),
            "yes" if yes else "no", ["no" if yes else "yes"], balancer,
            _ids(truth.regions_of(name)) if yes else (),
        ))

    listed = join_words([TISSUE_CLASSES[c].label for c in ordered_classes(truth)])
    out.append(_open("tissue_types", _wording("tissue_types", rng),
                     listed[:1].upper() + listed[1:] + "."))

    if truth.spec.n_regions >= 4:
        # One question per class that lies in exactly one region: "where" is the hardest
        # family to learn (class and place together), so it gets every example the slide has.
        for name in (c for c in present if len(truth.regions_of(c)) == 1):
            target = truth.regions_of(name)[0]
            others = [r.location for r in truth.regions if r.index != target.index]
            picked = [others[int(i)] for i in rng.choice(len(others), 3, replace=False)]
            out.append(_closed(
                "location", _wording("location", rng, label=TISSUE_CLASSES[name].label),
                target.location, picked, balancer, (target.hid,),
            ))

    # "The neoplasm" must be one thing: the slide's only lesion, and one of the shape pair.
    if len(lesions) == 1 and lesions[0] in SHAPE_PAIR:
        pair = lesions
        shape = TISSUE_CLASSES[pair[0]].nucleus_shape
        correct = _SHAPE_OPTIONS[0] if shape == "round" else _SHAPE_OPTIONS[1]
        wrong = [o for o in _SHAPE_OPTIONS if o != correct]
        out.append(_closed("nuclear_shape", _wording("nuclear_shape", rng), correct, wrong,
                           balancer, _ids(truth.regions_of(pair[0]))))

    if truth.spec.n_regions > 1:
        # Every region described by its place: the reverse of "where", place -> tissue.
        for region in truth.regions:
            sentence = region_sentence(region, truth)
            answer = "It shows " + sentence.split(" shows ", 1)[1]
            out.append(_open("describe_region", _wording("describe_region", rng,
                                                         location=region.location),
                             answer, (region.hid,)))

    out.append(_open("caption", _wording("caption", rng), caption(truth)))
    out.append(_open("report", _wording("report", rng), report(truth)))
    return out


def evidence_target(question: Question, truth: SlideTruth) -> dict[str, Any] | None:
    """``{"region_ids": [id], "polygons": [GeoJSON geometry]}``, or None if not localisable.

    A question is localisable when its finding lies in exactly one region of a slide of at
    least 4 regions: then one region is right and the pointing game's chance is at most 1/4.
    A finding spread over several regions (a lesion in two) has no single place to point at.
    """
    if len(question.regions) != 1 or truth.spec.n_regions < 4:
        return None
    by_id = {r.hid: r for r in truth.regions}
    regions = [by_id[hid] for hid in question.regions]
    return {
        "region_ids": [r.hid for r in regions],
        "polygons": [_geometry(r) for r in regions],
    }


def _geometry(region: RegionTruth) -> dict[str, Any]:
    return dict(mapping(shapely.set_precision(region.geometry, 0.01)))
