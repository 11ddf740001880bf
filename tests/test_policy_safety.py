"""Prompt policy (normalization, obfuscated terms, patterns, file errors) and the output safety checker."""

from __future__ import annotations

import time

import numpy as np
import PIL.Image
import pytest

from pipelines.policy import PolicyError, PromptPolicy, normalize
from pipelines.safety import ACTIONS, SafetyChecker, blur, frames_to_check
from pipelines.tiny.safety import SAFETY_MODELS, set_checker_mode

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


# --- policy -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy() -> PromptPolicy:
    return PromptPolicy.from_lists(terms=["bad", "gore", "blood bath"], patterns=[r"kill(ing)? (all|every)\w*"])


@pytest.mark.parametrize(
    "text",
    [
        "a bad dog",
        "BaD",
        "ｂａｄ",  # full-width
        "𝐛𝐚𝐝",  # mathematical bold
        "b\u200bad",  # zero-width space
        "b\u00adad",  # soft hyphen
        "b\u2060a\ufeffd",  # word joiner, BOM
        "bád",  # accented look-alike
        "B̸AD",  # combining overlay
        "b\u0430d",  # Cyrillic a
        "b.a.d",
        "b a d",
        "b-a-d",
        "b_a_d",
        "b . a . d",
        "so,b.a.d!",
        "#gore",
        "gore_fest",
        "blood bath",
        "blood \n\t bath",
        "Blood-Bath",
        "b.l.o.o.d b.a.t.h",
    ],
)
def test_blocked_terms_and_obfuscations_are_caught(policy, text):
    assert policy.check(text) is not None, text


@pytest.mark.parametrize(
    "text",
    ["badge", "a badly drawn cat", "gorgeous sunset", "Gorey", "gore2", "go re-enter", "b.a d", "ba.d", "bloodbath", "b4d", ""],
)
def test_innocent_or_uncaught_text_passes(policy, text):
    assert policy.check(text) is None, text


def test_rule_names_and_order(policy):
    assert policy.check("ＢＡＤ") == "term:bad"
    assert policy.check("Killing everyone") == r"pattern:kill(ing)? (all|every)\w*"
    assert policy.check("kill all bad things") == "term:bad"  # terms first
    assert policy.check(None, "fine", "a gore scene") == "term:gore"  # any of the texts
    assert policy.check(None) is None
    assert PromptPolicy.from_lists().check("bad") is None


def test_normalize():
    assert normalize("  Ｈéllo\u200b   WÖRLD\t\n ") == "hello world"
    assert normalize("Straße") == "strasse"
    assert normalize("नमस्ते") == "नमस्ते"  # marks on other scripts stay


def test_load_yaml(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("terms: [bad, blood bath]\npatterns: ['\\bx{3,}\\b']\n")
    loaded = PromptPolicy.load(path)
    assert [name for name, _ in loaded.rules] == ["term:bad", "term:blood bath", r"pattern:\bx{3,}\b"]
    assert loaded.check("XXXX") == r"pattern:\bx{3,}\b"
    assert loaded.check("xx") is None
    (tmp_path / "empty.yaml").write_text("")
    assert PromptPolicy.load(tmp_path / "empty.yaml").rules == ()


@pytest.mark.parametrize(
    "content, message",
    [
        ("terms: [bad]\nblocked: [x]\nextra: 1\n", "['blocked', 'extra']"),
        ("patterns: ['(unclosed']\n", "'(unclosed'"),
        ("terms: bad\n", "'terms' must be a list"),
        ("terms: [bad, 3]\n", "3"),
        ("terms: ['  ']\n", "non-empty"),
        ("- bad\n", "mapping"),
        ("terms: [bad\n", "not valid YAML"),
    ],
)
def test_bad_policy_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "policy.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match="policy") as info:
        PromptPolicy.load(path)
    assert message in str(info.value)


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        PromptPolicy.load(tmp_path / "nope.yaml")


# --- safety -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-safety-checker")
    SAFETY_MODELS["tiny-safety-checker"].write(directory)
    return directory


def _images(n: int, size: int = 64) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_tiny_checker_layout_and_default(checker_dir):
    assert SAFETY_MODELS["tiny-safety-checker"].entry == {"kind": "safety_checker"}
    names = {p.name for p in checker_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)
    images = _images(3)
    before = [np.asarray(im).copy() for im in images]
    assert SafetyChecker.from_pretrained(str(checker_dir)).check(images) == [False] * 3
    assert all((np.asarray(im) == b).all() for im, b in zip(images, before))


def test_modes_flag_all_or_none(checker_dir, tmp_path):
    import shutil

    directory = tmp_path / "checker"
    shutil.copytree(checker_dir, directory)
    images = _images(8) + [PIL.Image.new("L", (48, 80), 0), PIL.Image.new("RGBA", (80, 48), (255, 0, 0, 128))]
    before = [np.asarray(im).copy() for im in images]

    set_checker_mode(directory, "flag_all")
    checker = SafetyChecker.from_pretrained(str(directory))
    assert checker.check(images) == [True] * len(images)
    assert all((np.asarray(im) == b).all() for im, b in zip(images, before)), "checker must not black out inputs"
    assert checker.check([]) == []

    set_checker_mode(directory, "pass_all")
    assert SafetyChecker.from_pretrained(str(directory)).check(images) == [False] * len(images)

    with pytest.raises(ValueError, match="unknown checker mode"):
        set_checker_mode(directory, "sometimes")


def test_pipeline_layout_and_errors(checker_dir, tmp_path):
    import shutil

    from pipelines.loading import ModelLoadError

    pipe = tmp_path / "pipe"
    shutil.copytree(checker_dir, pipe / "safety_checker")
    (pipe / "feature_extractor").mkdir()
    shutil.move(pipe / "safety_checker" / "preprocessor_config.json", pipe / "feature_extractor")
    set_checker_mode(pipe, "flag_all")
    assert SafetyChecker.from_pretrained(str(pipe)).check(_images(2)) == [True, True]

    with pytest.raises(ModelLoadError, match="no safety checker"):
        SafetyChecker.from_pretrained(str(tmp_path / "empty"))
    pickled = tmp_path / "pickled"
    shutil.copytree(checker_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle-only"):
        SafetyChecker.from_pretrained(str(pickled))


def test_check_time_is_small(checker_dir):
    checker = SafetyChecker.from_pretrained(str(checker_dir))
    images = _images(8)
    checker.check(images)
    start = time.perf_counter()
    checker.check(images)
    assert (time.perf_counter() - start) / 8 < 0.05


def test_blur_is_strong_and_keeps_size_and_mode():
    (image,) = _images(1, size=96)
    image = image.resize((96, 64))
    out = blur(image)
    assert out.size == image.size and out.mode == image.mode
    diff = np.abs(np.asarray(out, dtype=np.float32) - np.asarray(image, dtype=np.float32)).mean()
    assert diff > 40, diff
    # A structured image (half black, half white) loses its edge.
    half = PIL.Image.new("RGB", (64, 64), 0)
    half.paste((255, 255, 255), (32, 0, 64, 64))
    blurred = np.asarray(blur(half), dtype=np.float32)
    assert np.abs(np.diff(blurred, axis=1)).max() < 40  # a 255 step spread over many pixels
    for mode in ("L", "RGBA", "P", "LA"):
        converted = image.convert(mode)
        result = blur(converted)
        assert result.mode == mode and result.size == image.size


def test_frames_to_check():
    assert frames_to_check(10, 4) == [0, 4, 8, 9]
    assert frames_to_check(9, 4) == [0, 4, 8]
    assert frames_to_check(1, 4) == [0]
    assert frames_to_check(3, 1) == [0, 1, 2]
    assert frames_to_check(0, 4) == []
    with pytest.raises(ValueError):
        frames_to_check(10, 0)
    assert ACTIONS == ("block", "blur", "flag")
