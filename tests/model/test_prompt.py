import pytest
from transformers import AutoTokenizer

from sentiment_ray.model.prompt import PromptEncoder, PromptError, PromptSpec, clip_tokens


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_clip_policies():
    ids = list(range(10))
    assert clip_tokens(ids, 20, "head_tail", 0.25) == ids
    assert clip_tokens(ids, 4, "head", 0.25) == [0, 1, 2, 3]
    assert clip_tokens(ids, 4, "tail", 0.25) == [6, 7, 8, 9]
    assert clip_tokens(ids, 4, "head_tail", 0.25) == [0, 7, 8, 9]
    assert clip_tokens(ids, 4, "head_tail", 0.5) == [0, 1, 8, 9]
    assert clip_tokens(ids, 4, "head_tail", 0.0) == [6, 7, 8, 9]


@pytest.mark.parametrize("kwargs, message", [
    ({"template": "no slot"}, "exactly once"),
    ({"template": "{text} and {text}"}, "exactly once"),
    ({"label_words": (" good", " good")}, "two different"),
    ({"truncation": "middle"}, "truncation"),
    ({"head_fraction": 1.5}, "head_fraction"),
    ({"max_length": 4}, "max_length"),
])
def test_invalid_specs(kwargs, message):
    with pytest.raises(PromptError, match=message):
        PromptSpec(**kwargs)


def test_prompt_layout_and_label_tokens(tokenizer):
    encoder = PromptEncoder(PromptSpec(max_length=64), tokenizer)
    # The tiny tokenizer adds BOS like Llama/Mistral; it must lead every prompt exactly once.
    assert encoder.prefix_ids[0] == tokenizer.bos_token_id
    (prompt,) = encoder.encode_prompts(["great movie"])
    assert prompt.input_ids[: len(encoder.prefix_ids)] == encoder.prefix_ids
    assert prompt.input_ids[-len(encoder.suffix_ids):] == encoder.suffix_ids
    assert not prompt.truncated
    negative, positive = encoder.label_token_ids
    assert tokenizer.decode([positive]) == " positive" and tokenizer.decode([negative]) == " negative"
    # Decoding the whole prompt gives back the template with the review in it.
    assert tokenizer.decode(prompt.input_ids, skip_special_tokens=True) == "Review: great movie\nSentiment:"


def test_long_reviews_fit_max_length_and_keep_the_cue(tokenizer):
    spec = PromptSpec(max_length=48, head_fraction=0.25)
    encoder = PromptEncoder(spec, tokenizer)
    words = [f"w{i}" for i in range(300)]
    (prompt,) = encoder.encode_prompts([" ".join(words)])
    assert prompt.truncated
    assert len(prompt.input_ids) == spec.max_length - 1  # room for the one-token completion
    assert prompt.input_ids[-len(encoder.suffix_ids):] == encoder.suffix_ids
    text = tokenizer.decode(prompt.input_ids, skip_special_tokens=True)
    assert text.startswith("Review: w0") and "w299\nSentiment:" in text  # head and tail both kept


def test_example_trains_on_the_label_token_only(tokenizer):
    encoder = PromptEncoder(PromptSpec(max_length=64), tokenizer)
    (prompt,) = encoder.encode_prompts(["dull film"])
    example = encoder.encode_example(prompt.input_ids, 0)
    assert example["input_ids"] == prompt.input_ids + [encoder.label_token_ids[0]]
    assert example["completion_mask"] == [0] * len(prompt.input_ids) + [1]


def test_multi_token_label_word_is_refused(tokenizer):
    with pytest.raises(PromptError, match="not a single token"):
        PromptEncoder(PromptSpec(label_words=(" negative", " xylophonically")), tokenizer)


def test_max_length_too_small_for_the_template(tokenizer):
    with pytest.raises(PromptError, match="raise max_length"):
        PromptEncoder(PromptSpec(template="Review of the film, in full: {text}\nSentiment of it:", max_length=12),
                      tokenizer)


def test_cleaning_replaces_html_breaks():
    assert PromptSpec().clean("Good.<br /><br />Bad.") == "Good.  Bad."
    assert PromptSpec(clean_html_breaks=False).clean("a<br />b") == "a<br />b"
