"""Tests for gal_jax.anchors: template sets, files, concept phrases and anchor prompts."""

import pytest

from gal_jax import anchors


@pytest.mark.parametrize("name", ["paper", "official"])
@pytest.mark.parametrize("kind", ["object", "style"])
def test_every_named_set_has_18_distinct_templates_with_one_slot(name, kind):
    templates = anchors.get_anchor_templates(name, kind)
    assert len(templates) == 18 and len(set(templates)) == 18
    assert all(template.count("{}") == 1 for template in templates)


def test_paper_object_set_is_table_5_in_order():
    templates = anchors.get_anchor_templates("paper", "object")
    assert templates[:3] == ("{} in park", "{} near a pool", "{} on street")
    assert templates[-1] == "{} on a balcony"
    assert all(template.startswith("{} ") for template in templates)


def test_style_sets_put_the_descriptor_at_the_end():
    paper = anchors.get_anchor_templates("paper", "style")
    official = anchors.get_anchor_templates("official", "style")
    assert paper[0] == "A tie {}" and paper[-1] == "A banana on the table {}"
    assert official[1] == "candy {}" and official[-1] == "A knife {}"
    assert all(template.endswith(" {}") for template in paper + official)


def test_official_object_set_follows_the_authors_script():
    templates = anchors.get_anchor_templates("official", "object")
    assert templates[0] == "{} in a workshop" and templates[-1] == "{} under a tree"
    assert "{} at an aquarium" in templates and "{} on a subway" in templates


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="'scene'"):
        anchors.get_anchor_templates("paper", "scene")


def test_unknown_name_that_is_not_a_file_is_rejected(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        anchors.get_anchor_templates(str(missing), "object")


def test_template_file_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my anchors\n{} in a tent\n\n   \n  {} on a roof  \n# end\n")
    assert anchors.get_anchor_templates(path, "object") == ("{} in a tent", "{} on a roof")


@pytest.mark.parametrize(
    "text, line, problem",
    [
        ("{} in a tent\nno slot here\n", 2, "exactly one"),
        ("# head\n{} and {} twice\n", 2, "exactly one"),
        ("{} in a tent\n\n{} in a tent\n", 3, "repeats line 1"),
    ],
)
def test_template_file_errors_name_file_and_line(tmp_path, text, line, problem):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(anchors.AnchorFileError, match=f"bad.txt:{line}: .*{problem}"):
        anchors.get_anchor_templates(str(path), "object")


@pytest.mark.parametrize("text", ["", "\n# only a comment\n\n"])
def test_empty_template_file_is_an_error(tmp_path, text):
    path = tmp_path / "empty.txt"
    path.write_text(text)
    with pytest.raises(anchors.AnchorFileError, match="empty.txt: no anchor templates"):
        anchors.get_anchor_templates(path, "style")


def test_object_concept_phrase_is_article_placeholder_class():
    assert anchors.concept_phrase_object("<cute-cat>", "cat") == "a <cute-cat> cat"
    assert anchors.concept_phrase_object("sks", "wooden_pot") == "a sks wooden pot"


@pytest.mark.parametrize("placeholder, class_word", [("", "cat"), ("sks", " "), ("sks", "_")])
def test_object_concept_phrase_rejects_empty_parts(placeholder, class_word):
    with pytest.raises(ValueError, match="non-empty"):
        anchors.concept_phrase_object(placeholder, class_word)


def test_style_descriptor_starts_at_the_last_in():
    assert anchors.style_descriptor("A cat in watercolor painting style") == (
        "in watercolor painting style"
    )
    assert anchors.style_descriptor("A cat sitting in a box in ukiyo-e style") == "in ukiyo-e style"


@pytest.mark.parametrize("caption", ["A cat, watercolor", "in watercolor style", "A cat in "])
def test_style_descriptor_needs_a_subject_and_a_style_around_in(caption):
    with pytest.raises(ValueError, match="' in '"):
        anchors.style_descriptor(caption)


def test_object_anchor_prompt_reads_naturally():
    phrase = anchors.concept_phrase_object("sks", "cat")
    assert anchors.fill_anchor("{} in park", phrase) == "a sks cat in park"


def test_style_anchor_prompt_appends_the_descriptor():
    descriptor = anchors.style_descriptor("A cat in watercolor painting style")
    assert anchors.fill_anchor("A tie {}", descriptor) == "A tie in watercolor painting style"


def test_fill_anchor_keeps_other_braces_and_collapses_spacing():
    assert anchors.fill_anchor(" {}  near {x} ", "a sks cat") == "a sks cat near {x}"


@pytest.mark.parametrize("template, phrase", [("no slot", "a cat"), ("{} {}", "a cat"),
                                              ("{} in park", "  ")])
def test_fill_anchor_rejects_bad_template_or_phrase(template, phrase):
    with pytest.raises(ValueError):
        anchors.fill_anchor(template, phrase)


def test_anchor_prompts_fill_every_template_in_pool_order():
    templates = anchors.get_anchor_templates("official", "object")[:2]
    assert anchors.anchor_prompts(templates, "a <cute-cat> cat") == (
        "a <cute-cat> cat in a workshop",
        "a <cute-cat> cat in a museum",
    )


SUBJECTS = {"a": "olis harry potter toy", "b": "hta corgi"}


def test_named_slots_fill_each_subject_and_a_plain_slot_names_them_all(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("{a} and {b} playing together on the beach\n{b} next to {a} {keep}\n{} in park\n{a} alone\n")
    templates = anchors.get_anchor_templates(path, "object", list(SUBJECTS))
    assert anchors.anchor_prompts(templates, "olis harry potter toy and hta corgi", SUBJECTS) == (
        "olis harry potter toy and hta corgi playing together on the beach",
        "hta corgi next to olis harry potter toy {keep}",
        "olis harry potter toy and hta corgi in park",
        "olis harry potter toy alone",
    )


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{a} and {b}\n{a} and {} twice\n", "mixes '{}' with named subject slots"),
        ("{a} and {b}\n{a} and {a}\n", r"names subject slot\(s\) {a} more than once"),
        ("{a} and {b}\n{c} is no subject\n", r"exactly one '{}' or named subject slots \({a}, {b}\)"),
    ],
)
def test_named_slot_errors_name_file_and_line(tmp_path, text, problem):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(anchors.AnchorFileError, match=f"bad.txt:2: .*{problem}"):
        anchors.get_anchor_templates(path, "object", list(SUBJECTS))


def test_named_slots_need_a_multi_subject_concept(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("{a} and {b} on the beach\n")
    with pytest.raises(anchors.AnchorFileError, match=r"two.txt:1: .*exactly one '{}' \(found 0"):
        anchors.get_anchor_templates(path, "object")


def test_the_shipped_two_subject_templates_read(tmp_path):
    from pathlib import Path

    path = Path(__file__).parent.parent / "configs" / "anchors" / "two_subjects.txt"
    prompts = anchors.anchor_prompts(anchors.get_anchor_templates(path, "object", ["a", "b"]), "x and y",
                                     {"a": "<p> toy", "b": "<q> dog"})
    assert len(prompts) == 18 and len(set(prompts)) == 18
    assert all("<p> toy" in p and "<q> dog" in p and "{" not in p for p in prompts)
