"""The concept of an experiment: its original references and every prompt built from them.

Read once per run from the concept folder (the authors' `init.json` layout) and the config: the
concept phrase ("a <cute-cat> cat", or a style descriptor "in watercolor painting style"), the
plain prompts the overfit oracle compares with, the class prompt and images for prior
preservation, and the anchor pool (a prompt's index in it is its prompt_id for the whole run).

A multi-subject concept (MuDI's metadata.jsonl) whose class folder holds MuDI's
class_metadata.jsonl has a masked prior set: class images with their own captions, masks and
subjects, paired and mixed by subject in training (see data.write_training_set).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections

from gal_jax import anchors, data, io_utils, multi_subject, personalize
from gal_jax.records import NO_IDENTITY_CHECK


@dataclasses.dataclass(frozen=True)
class Concept:
    """The concept of an experiment: its original references and the prompts built from them."""

    kind: str
    references: tuple[data.Reference, ...]
    class_images: tuple[Path, ...]
    class_prompt: str
    phrase: str
    plain_prompts: tuple[str, ...]
    anchor_prompts: tuple[str, ...]  # the original pool; a prompt's index is its prompt_id
    anchor_file: Path | None = None  # the user's template file, when one is used
    placeholder: str = ""  # objects: the identifier ("<cute-cat>"), the new token of textual inversion
    class_word: str = ""  # objects: the class ("cat", "wooden pot")
    # Multi-subject concepts (MuDI's metadata.jsonl): identifier phrase by subject id, in file order.
    subjects: dict[str, str] = dataclasses.field(default_factory=dict)
    # Their masked prior set (class_metadata.jsonl): class word by id, and the class images (the
    # same as class_images) with captions and masks; None for a plain class folder.
    prior: multi_subject.MultiSubjectSet | None = None

    @property
    def concept_file(self) -> str:
        """The file in the concept folder that lists the references."""
        return multi_subject.METADATA if self.subjects else data.INIT_JSON


def load_concept(config: ml_collections.ConfigDict, concept_dir: Path, class_dir: Path | None,
                 concepts_json: Path | None = None) -> Concept:
    """Returns the concept: references, class images, concept phrase, plain and anchor prompts.

    `concepts_json` (the authors' concepts list, when one is at hand) names an object's class by
    the entry whose placeholder is the concept's.
    """
    kind = config.data.kind
    multi = is_multi_subject(concept_dir)
    method = personalize.method_name(config)
    if method in personalize.MULTI_SUBJECT_METHODS and not multi:
        raise ValueError(f"config.train.method={method!r} trains several subjects at once: "
                         f"config.data.concept_dir={str(concept_dir)!r} needs MuDI's {multi_subject.METADATA} "
                         "(and no init.json)")
    if config.data.get("segmix") and config.data.segmix.prob and not multi:
        raise ValueError(f"config.data.segmix.prob={config.data.segmix.prob} mixes the subjects of a multi-subject "
                         f"concept; {concept_dir} has no {multi_subject.METADATA}")
    check = identity_check(config)
    if check != NO_IDENTITY_CHECK and not multi:
        raise ValueError(f"config.gal.identity_check={check!r} checks the subjects of a multi-subject concept; "
                         f"{concept_dir} has no {multi_subject.METADATA}")
    if multi:
        return _multi_subject_concept(config, Path(concept_dir), class_dir)
    references = tuple(data.load_concept(concept_dir))
    if kind == "object":
        placeholder = config.data.placeholder or find_placeholder(references, concept_dir)
        noun = class_phrase(config.data.class_word, placeholder, references, concept_dir, concepts_json)
        phrase = anchors.concept_phrase_object(placeholder, noun)
        plain = [r.plain_prompt or r.prompt for r in references]
        class_prompt = config.data.class_prompt or f"a photo of a {noun}"
    else:
        placeholder, noun = "", ""
        phrase = anchors.style_descriptor(references[0].prompt)
        plain = [r.prompt for r in references]
        class_prompt = config.data.class_prompt
    if personalize.method_name(config) in personalize.NEW_TOKEN_METHODS:
        check_new_token_is_used(config.train.get("new_token", "") or placeholder, references, phrase, concept_dir)
    return Concept(
        kind=kind,
        references=references,
        class_images=_class_images(config, class_dir if kind == "object" else None),
        class_prompt=class_prompt,
        phrase=phrase,
        plain_prompts=tuple(dict.fromkeys(" ".join(p.split()) for p in plain)),
        **_anchors(config, kind, phrase),
        placeholder=placeholder,
        class_word=noun,
    )


def check_new_token_is_used(token: str, references, phrase: str, concept_dir: Path) -> None:
    """Raises ValueError unless the new token of textual inversion / AttnDreamBooth is in every
    reference's caption and in the concept phrase: a token in neither would be trained on captions
    that never read it (or never asked for in the anchor prompts), and the run would learn nothing.
    An empty token is left to `personalize.prepare`, which names the fields to set."""
    if not token:
        return
    for reference in references:
        if token not in reference.prompt:
            raise ValueError(
                f"{concept_dir}/{data.INIT_JSON}: the new token {token!r} (config.train.new_token, else the "
                f"placeholder) is not in the caption {reference.prompt!r} of {reference.image.name}: textual "
                "inversion would never train it; write it into every caption (a style: 'A cat in "
                f"{token} style')")
    if token not in phrase:
        raise ValueError(f"the new token {token!r} (config.train.new_token) is not in the concept phrase {phrase!r} "
                         "that every anchor prompt is built from; set config.data.placeholder to it (objects)")


def _class_images(config: ml_collections.ConfigDict, class_dir: Path | None) -> tuple[Path, ...]:
    """Returns the class images for prior preservation (at most data.num_class_images), or none
    when train.with_prior is off or there is no class folder."""
    if not (config.train.with_prior and class_dir is not None):
        return ()
    if (Path(class_dir) / multi_subject.CLASS_METADATA).is_file():
        raise ValueError(f"{Path(class_dir) / multi_subject.CLASS_METADATA}: a masked prior set pairs class images "
                         "with the subjects of a multi-subject concept (MuDI's metadata.jsonl); this concept has one "
                         "subject, and the folder's masks would be read as class images")
    return tuple(data.list_class_images(class_dir))[: config.data.num_class_images]


def _anchors(config: ml_collections.ConfigDict, kind: str, phrase: str, subjects: dict[str, str] | None = None) -> dict:
    """Returns the Concept's anchor_prompts (config.gal.anchors' templates filled with `phrase`,
    or a multi-subject concept's `subjects` phrases in their named slots) and anchor_file (the
    user's template file, None for a named set)."""
    templates = anchors.get_anchor_templates(config.gal.anchors, kind, list(subjects or {}))
    named_set = (str(config.gal.anchors), kind) in anchors.ANCHOR_SETS
    return {"anchor_prompts": anchors.anchor_prompts(templates, phrase, subjects),
            "anchor_file": None if named_set else Path(config.gal.anchors).expanduser().absolute()}


def identity_check(config: ml_collections.ConfigDict) -> str:
    """Returns config.gal.identity_check ('none' in configs written before it existed)."""
    return config.gal.get("identity_check", NO_IDENTITY_CHECK)


def is_multi_subject(concept_dir: Path) -> bool:
    """Whether the concept folder is a multi-subject set (MuDI's metadata.jsonl, no init.json)."""
    concept_dir = Path(concept_dir)
    return (concept_dir / multi_subject.METADATA).is_file() and not (concept_dir / data.INIT_JSON).is_file()


def _multi_subject_concept(config: ml_collections.ConfigDict, concept_dir: Path, class_dir: Path | None) -> Concept:
    """Returns the concept of a MuDI data set: every image a reference with its mask and subject;
    the concept phrase names all subjects ("<a> teapot and <b> cat"); the plain prompts are the
    captions with each subject's identifier phrase replaced by its class (the phrase without its
    first word, MuDI's "<identifier> <class>" convention: "olis harry potter toy" -> "harry potter
    toy"); the class prompt names the classes ("a photo of a harry potter toy and a corgi")."""
    if config.data.kind != "object":
        raise ValueError(f"{concept_dir / multi_subject.METADATA}: a multi-subject concept is of "
                         f"config.data.kind='object', not {config.data.kind!r}")
    if config.data.placeholder or config.data.class_word:
        raise ValueError(f"{concept_dir / multi_subject.METADATA}: config.data.placeholder and class_word name one "
                         "subject; a multi-subject concept takes its subjects from the file's first line")
    subjects = multi_subject.read_metadata(concept_dir / multi_subject.METADATA)
    if identity_check(config) != NO_IDENTITY_CHECK and len(subjects.subjects) < 2:
        raise ValueError(f"{subjects.file}: config.gal.identity_check={identity_check(config)!r} compares "
                         f"subjects, and the file names one ({list(subjects.subjects)})")
    prior = _prior_set(config, class_dir, subjects.subjects)
    classes = {s: multi_subject.class_of(phrase) for s, phrase in subjects.subjects.items()}
    references = tuple(
        data.Reference(image=item.image, prompt=item.text, weight=1.0, mask=item.mask, subject=item.subject,
                       plain_prompt=multi_subject.replace_phrases(item.text, subjects.subjects, classes))
        for item in subjects.images)
    phrase = multi_subject.joined([subjects.subjects[s] for s in subjects.subjects])
    class_prompt = config.data.class_prompt or "a photo of " + multi_subject.joined(
        [f"a {c}" for c in classes.values()])
    return Concept(
        kind="object",
        references=references,
        class_images=tuple(item.image for item in prior.images) if prior else _class_images(config, class_dir),
        class_prompt=class_prompt,
        phrase=phrase,
        plain_prompts=tuple(dict.fromkeys(" ".join(r.plain_prompt.split()) for r in references)),
        **_anchors(config, "object", phrase, subjects.subjects),
        subjects=dict(subjects.subjects),
        prior=prior,
    )


def _prior_set(config: ml_collections.ConfigDict, class_dir: Path | None,
               subjects: dict[str, str]) -> multi_subject.MultiSubjectSet | None:
    """Returns the masked prior set of a multi-subject concept: the class folder's MuDI
    class_metadata.jsonl (ids name the class words, the same ids as the concept's), each subject's
    first data.num_class_images images in file order (the cap is per subject: each class keeps
    its images, as MuDI pairs class images by subject); None when train.with_prior is off or the
    folder has no class_metadata.jsonl (a plain folder of class images under class_prompt).

    Raises MultiSubjectDataError naming the file when its ids are not the concept's.
    """
    if not (config.train.with_prior and class_dir is not None):
        return None
    file = Path(class_dir) / multi_subject.CLASS_METADATA
    if not file.is_file():
        return None
    prior = multi_subject.read_metadata(file)
    unknown = [s for s in prior.subjects if s not in subjects]
    missing = [s for s in subjects if s not in prior.subjects]
    if unknown or missing:
        raise multi_subject.MultiSubjectDataError(
            f"{file}, line 1: the prior's ids must be the concept's ({', '.join(map(repr, subjects))}); "
            + "; ".join(([f"not subjects of the concept: {unknown}"] if unknown else [])
                        + ([f"no class images for {missing}"] if missing else [])))
    cap = config.data.num_class_images
    kept = set(image for subject in prior.subjects for image in prior.of(subject)[:cap])
    return dataclasses.replace(prior, images=tuple(image for image in prior.images if image in kept))


def find_placeholder(references, concept_dir: Path) -> str:
    """Returns the placeholder token: the first word of the first reference's instance prompt
    that its plain prompt lacks ("A <cute-cat> cat on the stairs" vs "A cat on the stairs")."""
    first = references[0]
    plain_words = {w.lower() for w in (first.plain_prompt or "").split()}
    missing = [w for w in first.prompt.split() if w.lower() not in plain_words]
    if first.plain_prompt is None or not missing:
        raise ValueError(
            f"{concept_dir}/init.json: cannot find the placeholder in {first.prompt!r} vs its plain prompt "
            f"{first.plain_prompt!r}; set config.data.placeholder (and config.data.class_word)."
        )
    return missing[0]


def class_phrase(class_word: str, placeholder: str, references, concept_dir: Path,
                 concepts_json: Path | None) -> str:
    """Returns the class as a phrase ("wooden pot", "cat statue", "teddybear"), never one guessed token.

    In order: config.data.class_word; the class_prompt of the concepts list's entry with this
    placeholder ('_' read as a space); else the words after the placeholder that every reference's
    instance prompt shares ("<wp> wooden pot on the table" and "<wp> wooden pot next to the
    window" -> "wooden pot"), cut before the first function word when all captions agree
    ("<cute-cat> cat on the stairs" -> "cat").
    """
    if class_word:
        return anchors.class_noun(class_word)
    listed = _listed_class(placeholder, concepts_json)
    if listed:
        return anchors.class_noun(listed)
    tails = [_words_after(r.prompt, placeholder) for r in references]
    shared = []
    for words in zip(*tails):
        if len({w.lower() for w in words}) > 1:
            break
        shared.append(words[0])
    cut = next((i for i, w in enumerate(shared) if w.lower().strip(",.;:") in _FUNCTION_WORDS or
                not w.strip(",.;:")), len(shared))
    noun = " ".join(w.strip(",.;:") for w in shared[:cut])
    if not noun:
        raise ValueError(
            f"{concept_dir}/init.json: cannot tell the class after {placeholder!r} in "
            f"{references[0].prompt!r}; set config.data.class_word (e.g. 'wooden_pot')."
        )
    return noun


# Words that end a class phrase in a caption ("cat on the stairs", "table next to sofa").
_FUNCTION_WORDS = frozenset(
    "a an the on in at of with without near next to by under over above below behind beside "
    "between from into onto and or for during while is are sitting standing lying floating "
    "wearing holding".split()
)


def _words_after(prompt: str, placeholder: str) -> list[str]:
    words = prompt.split()
    for i, word in enumerate(words):
        if word == placeholder:
            return words[i + 1:]
    return []


def _listed_class(placeholder: str, concepts_json: Path | None) -> str | None:
    """Returns the class_prompt of the concepts list entry whose placeholder is `placeholder`."""
    if concepts_json is None or not Path(concepts_json).is_file():
        return None
    entries = io_utils.read_json(concepts_json)
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("placeholder") == placeholder:
            value = entry.get("class_prompt")
            return value if isinstance(value, str) and value.strip() else None
    return None
