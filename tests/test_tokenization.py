"""Text tokenizers, the unified CogView vocabulary and the task layouts."""

import random
import unicodedata

import numpy as np
import pytest
import torch

from cogview.tokenization import (
    COMMAND_TOKENS,
    CharTokenizer,
    CogViewVocab,
    SentencePieceTokenizer,
    build_text_tokenizer,
    caption_layout,
    caption_prompt,
    char_vocabulary,
    collate_layouts,
    decode_text,
    encode_caption,
    extract_image_codes,
    extract_text_ids,
    load_text_tokenizer,
    next_span_kind,
    sr_layout,
    sr_prompt,
    t2i_layout,
    t2i_prompt,
    text_slots_for,
)
from cogview.tokenization.train_sentencepiece import main as train_sentencepiece_main
from cogview.tokenization.train_sentencepiece import train_sentencepiece

# shapes-zh words (spelled out here, not imported: the data module is separate)
COLORS = "红色 橙色 黄色 绿色 蓝色 紫色 黑色".split()
SHAPES = "圆形 正方形 三角形 菱形".split()
POSITIONS = "左上角 正上方 右上角 左边 中间 右边 左下角 正下方 右下角".split()
SIZES = ["大", "小"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)

    def clause():
        position, size = rng.choice(POSITIONS), rng.choice(SIZES)
        return f"{position}有一个{size}的{rng.choice(COLORS)}{rng.choice(SHAPES)}"

    return [clause() if rng.random() < 0.6 else clause() + "，" + clause() for _ in range(n)]


def nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def gb2312_hanzi() -> str:
    chars = []
    for hi in range(0xB0, 0xF8):
        for lo in range(0xA1, 0xFF):
            try:
                chars.append(bytes([hi, lo]).decode("gb2312"))
            except UnicodeDecodeError:
                pass
    return "".join(chars)


@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    corpus = root / "captions.txt"
    corpus.write_text("\n".join(make_captions(2000)) + "\n")
    train_sentencepiece(corpus, root / "unigram", vocab_size=200, model_type="unigram",
                        character_coverage=1.0, num_threads=1)
    return root


# ------------------------------------------------------------------------------------------------
# vocabulary


def test_cogview_ids_exact():
    vocab = CogViewVocab(num_image_codes=8192, text_vocab_size=50000)
    assert vocab.text_to_vocab([0, 1, 49999]) == [8192, 8193, 58191]
    assert vocab.pad_id == vocab.command("[PAD]") == 58192
    assert vocab.boi1_id == 58193 and vocab.boi2_id == 58194 and vocab.boi3_id == 58195
    assert vocab.eoi1_id == 58196 and vocab.eoi2_id == 58197 and vocab.eoi3_id == 58198
    assert vocab.roi1_id == 58199 and vocab.roi2_id == 58200 and vocab.roi3_id == 58201
    assert (vocab.sep_id, vocab.mask_id, vocab.cls_id, vocab.enc_id) == (58202, 58203, 58204, 58205)
    sizes = (vocab.tiny_id, vocab.small_id, vocab.base_id, vocab.big_id)
    assert sizes == (58206, 58207, 58208, 58209)
    assert vocab.pos0_id == 58210 and vocab.command("POS8") == vocab.pos8_id == 58218
    assert vocab.size == len(vocab) == 58240
    assert vocab.image_range == (0, 8192) and vocab.text_range == (8192, 58192)
    assert [vocab.command(n) for n in COMMAND_TOKENS] == list(range(58192, 58219))


def test_vocab_membership_conversion_and_serialisation():
    vocab = CogViewVocab(num_image_codes=16, text_vocab_size=10)
    assert vocab.size == 128  # 16 + 10 + 27 = 53, padded to 128
    assert vocab.command("boi1") == vocab["[BOI1]"] == 27
    ids = torch.tensor([0, 15, 16, 25, 26, 52, 53, 127])
    assert vocab.is_image(ids).tolist() == [True, True, False, False, False, False, False, False]
    assert vocab.is_text(ids).tolist() == [False, False, True, True, False, False, False, False]
    assert vocab.is_image(3) and not vocab.is_text(3) and vocab.is_text(20)
    assert vocab.id_mask("image").sum() == 16 and vocab.id_mask("text")[16:26].all()
    assert vocab.id_mask("text").sum() == 10
    assert torch.equal(vocab.vocab_to_text(vocab.text_to_vocab(torch.arange(10))), torch.arange(10))
    with pytest.raises(ValueError, match="10"):
        vocab.text_to_vocab([3, 10])
    with pytest.raises(ValueError, match="26"):
        vocab.vocab_to_text([16, 26])
    with pytest.raises(KeyError, match="BOI4"):
        vocab.command("[BOI4]")
    assert CogViewVocab.from_dict(vocab.to_dict()) == vocab
    assert CogViewVocab.from_dict(vocab.to_dict()).roi1_id == vocab.roi1_id
    assert CogViewVocab.for_tokenizer(CharTokenizer(), 16).text_vocab_size == 7200
    with pytest.raises(ValueError, match="num_image_codes"):
        CogViewVocab(num_image_codes=0, text_vocab_size=10)


# ------------------------------------------------------------------------------------------------
# char tokenizer


def test_char_vocabulary_size_and_identity(char_tok):
    chars = char_vocabulary()
    hanzi = gb2312_hanzi()
    assert len(hanzi) == 6763
    assert set(hanzi) <= set(chars) and set(map(chr, range(0x20, 0x7F))) <= set(chars)
    assert all(nfkc(c) == c for c in chars)  # every entry reachable after normalisation
    assert char_tok.vocab_size == len(chars) + 256 == 7200
    # pretokenized shards are keyed on this; change it only together with CharTokenizer.VERSION
    assert char_tok.fingerprint() == "0b0b5d4422f787f0"
    assert CharTokenizer().fingerprint() == char_tok.fingerprint()


def test_char_round_trips(char_tok):
    ascii_text = "".join(map(chr, range(0x21, 0x7F))) + " The quick brown fox, 42!"
    assert char_tok.decode(char_tok.encode(ascii_text)) == ascii_text
    assert len(char_tok.encode(ascii_text)) == len(ascii_text)

    hanzi = gb2312_hanzi()
    ids = char_tok.encode(hanzi)
    assert len(ids) == 6763 and max(ids) < char_tok.byte_offset  # one char id each, no fallback
    assert char_tok.decode(ids) == hanzi

    cjk_punct = "、。「」『』《》【】“”‘’—·〔〕"
    ids = char_tok.encode(cjk_punct)
    assert len(ids) == len(cjk_punct) and max(ids) < char_tok.byte_offset
    assert char_tok.decode(ids) == cjk_punct

    caption = "左上角有一个大的红色圆形，右下角有一个小的蓝色菱形。"
    assert char_tok.decode(char_tok.encode(caption)) == nfkc(caption)
    assert len(char_tok.encode(caption)) == len(caption)


def test_char_nfkc_and_whitespace(char_tok):
    # full-width forms become their ASCII form under NFKC, and decode gives back that form
    assert char_tok.decode(char_tok.encode("红色，蓝色！（大）？：；")) == "红色,蓝色!(大)?:;"
    assert char_tok.encode("，") == char_tok.encode(",")
    assert char_tok.decode(char_tok.encode("好…")) == "好..."
    assert char_tok.encode("ＡＢＣ１２") == char_tok.encode("ABC12")
    # whitespace runs (tabs, newlines, ideographic space) collapse to one space; ends stripped
    assert char_tok.decode(char_tok.encode("  红色\t\n 圆形　大 ")) == "红色 圆形 大"
    assert char_tok.encode("   \n\t　") == []


def test_char_byte_fallback(char_tok):
    rare = "𠀀"  # U+20000, CJK extension B: not in GB2312
    emoji = "🎨"
    for ch in (rare, emoji, "é", "\x00"):
        ids = char_tok.encode(ch)
        assert len(ids) == len(ch.encode("utf-8"))
        assert all(i >= char_tok.byte_offset for i in ids)
        assert char_tok.decode(ids) == ch
    mixed = "画一只🐱在红色圆形里, size=大 𠀀 ok"
    assert char_tok.decode(char_tok.encode(mixed)) == char_tok.normalize(mixed)
    # a broken byte run decodes with replacement instead of failing
    assert char_tok.decode([char_tok.byte_offset + 0xE4, char_tok.encode("红")[0]]) == "\ufffd红"
    with pytest.raises(ValueError, match="7200"):
        char_tok.decode([7200])


def test_char_save_load(char_tok, tmp_path):
    char_tok.save(tmp_path / "tok")
    loaded = load_text_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, CharTokenizer) and loaded.fingerprint() == char_tok.fingerprint()


# ------------------------------------------------------------------------------------------------
# sentencepiece


def test_sentencepiece_train_load_round_trip(spm_dir, tmp_path):
    tok = load_text_tokenizer(spm_dir / "unigram")
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 200
    for caption in make_captions(50, seed=1):
        ids = tok.encode(caption)
        assert all(0 <= i < 200 for i in ids)
        assert len(ids) < len(caption)  # pieces span several characters
        assert tok.decode(ids) == nfkc(caption) == tok.normalize(caption)
    direct = build_text_tokenizer("sentencepiece", model_file=spm_dir / "unigram" / "spm.model")
    assert direct.fingerprint() == tok.fingerprint()
    tok.save(tmp_path / "copy")
    assert load_text_tokenizer(tmp_path / "copy").fingerprint() == tok.fingerprint()


@pytest.fixture(scope="module")
def bpe_tok(spm_dir):
    return train_sentencepiece(spm_dir / "captions.txt", spm_dir / "bpe", vocab_size=200,
                               model_type="bpe",
                               character_coverage=1.0, num_threads=1)


def test_fingerprints_differ_between_tokenizers(spm_dir, bpe_tok, char_tok):
    unigram = load_text_tokenizer(spm_dir / "unigram")
    assert len({bpe_tok.fingerprint(), unigram.fingerprint(), char_tok.fingerprint()}) == 3


def test_fingerprint_mismatch_detected(spm_dir, bpe_tok, tmp_path):
    load_text_tokenizer(spm_dir / "unigram").save(tmp_path / "tok")
    (tmp_path / "tok" / "spm.model").write_bytes(bpe_tok.model_bytes)  # model swapped after saving
    with pytest.raises(ValueError, match="fingerprint"):
        load_text_tokenizer(tmp_path / "tok")


def test_train_sentencepiece_cli(spm_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    corpus = f"input={spm_dir / 'captions.txt'}"
    rc = train_sentencepiece_main([corpus, f"out={out}", "vocab_size=150", "model_type=unigram",
                                   "character_coverage=1.0", "num_threads=1"])
    assert rc == 0 and (out / "spm.model").is_file()
    assert load_text_tokenizer(out).vocab_size == 150
    assert train_sentencepiece_main([corpus, f"out={out}", "vocab=150"]) == 2
    assert "unknown key 'vocab'" in capsys.readouterr().err
    assert train_sentencepiece_main([f"out={out}"]) == 2
    assert "input=" in capsys.readouterr().err


def test_factory_errors(tmp_path):
    assert isinstance(build_text_tokenizer(), CharTokenizer)
    with pytest.raises(ValueError, match="wordpiece"):
        build_text_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="model_file"):
        build_text_tokenizer("sentencepiece")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_text_tokenizer("sentencepiece", model_file=tmp_path / "nope.model")


def test_encode_caption_rejects_empty(char_tok):
    caption = "中间有一个大的红色圆形"
    assert encode_caption(char_tok, caption) == char_tok.encode(caption)
    for caption in ("", "   \t　"):
        with pytest.raises(ValueError, match="caption is empty"):
            encode_caption(char_tok, caption)
    assert encode_caption(char_tok, " ", allow_empty=True) == []


# ------------------------------------------------------------------------------------------------
# layouts (K=16 image codes, T=10 text ids: text id t -> 16 + t, [PAD]=26 ... [POS0]=44)


@pytest.fixture()
def vocab():
    return CogViewVocab(num_image_codes=16, text_vocab_size=10)


def assert_spans_cover(layout, vocab):
    """Spans hold exactly the image / text tokens; the token before each obeys the sampler rule."""
    image = torch.zeros(len(layout), dtype=torch.bool)
    text = torch.zeros(len(layout), dtype=torch.bool)
    for start, end, kind in layout.spans:
        (image if kind == "image" else text)[start:end] = True
        assert next_span_kind(vocab, layout.input_ids[start - 1]) == kind
    assert torch.equal(image, vocab.is_image(layout.input_ids))
    assert torch.equal(text, vocab.is_text(layout.input_ids))
    assert torch.equal(layout.text_mask, text)
    assert torch.equal(layout.position_ids, torch.arange(len(layout)))


def test_t2i_layout(vocab):
    layout = t2i_layout(vocab, [1, 2, 3], torch.tensor([[5, 6], [7, 8]]))
    assert layout.input_ids.tolist() == [33, 17, 18, 19, 42, 27, 5, 6, 7, 8, 30]
    assert layout.tokens(vocab)[:2] == ["[ROI1]", "txt:1"] and layout.tokens(vocab)[-1] == "[EOI1]"
    assert layout.spans == [(1, 4, "text"), (6, 10, "image")]
    assert layout.loss_mask.tolist() == [False] + [True] * 10
    assert layout.text_mask.tolist() == [False, True, True, True] + [False] * 7
    assert layout.text_truncated == 0 and layout.input_ids.dtype == torch.long
    assert_spans_cover(layout, vocab)


def test_caption_layout(vocab):
    layout = caption_layout(vocab, [1, 2, 3], [5, 6, 7, 8])
    assert layout.input_ids.tolist() == [42, 27, 5, 6, 7, 8, 30, 33, 17, 18, 19]
    assert layout.spans == [(2, 6, "image"), (8, 11, "text")]
    assert layout.loss_mask.tolist() == [False] * 8 + [True] * 3
    assert_spans_cover(layout, vocab)
    ended = caption_layout(vocab, [1, 2, 3], [5, 6, 7, 8], end_token="[SEP]")
    assert ended.input_ids.tolist()[-1] == vocab.sep_id == 36
    assert ended.loss_mask.tolist() == [False] * 8 + [True] * 4
    assert_spans_cover(ended, vocab)


def test_sr_layout(vocab):
    highres = np.arange(16, dtype=np.uint16).reshape(4, 4)
    layout = sr_layout(vocab, [1], [[1, 2], [3, 4]], highres, window=3)
    assert layout.input_ids.tolist() == ([33, 17, 42, 27, 1, 2, 3, 4, 30, 34, 47, 42, 28]
                                         + list(range(16)) + [31])
    assert layout.tokens(vocab)[9:13] == ["[ROI2]", "[POS3]", "[BASE]", "[BOI2]"]
    assert layout.spans == [(1, 2, "text"), (4, 8, "image"), (13, 29, "image")]
    assert layout.loss_mask.tolist() == [False] * 13 + [True] * 17
    assert_spans_cover(layout, vocab)
    with pytest.raises(ValueError, match="window"):
        sr_layout(vocab, [1], [1, 2, 3, 4], highres, window=9)


def test_prompts_are_prefixes(vocab):
    text, image, lowres = [1, 2, 3], [5, 6, 7, 8], [1, 2, 3, 4]
    cases = [
        (t2i_prompt(vocab, text), t2i_layout(vocab, text, image), "[BOI1]", "image"),
        (caption_prompt(vocab, image), caption_layout(vocab, text, image), "[ROI1]", "text"),
        (sr_prompt(vocab, text, lowres, window=2),
         sr_layout(vocab, text, lowres, list(range(16)), window=2), "[BOI2]", "image"),
    ]
    for prompt, layout, last, kind in cases:
        n = len(prompt)
        assert torch.equal(prompt.input_ids, layout.input_ids[:n])
        assert prompt.tokens(vocab)[-1] == last
        assert prompt.next_kind == kind == next_span_kind(vocab, prompt.input_ids[-1])
        assert not prompt.loss_mask.any()
        assert prompt.spans == [s for s in layout.spans if s[1] <= n]


def test_text_slots_give_image_tokens_the_same_positions_whatever_the_caption(vocab):
    image, lowres, highres = [5, 6, 7, 8], [1, 2, 3, 4], list(range(16))
    builders = {
        "t2i": lambda t: t2i_layout(vocab, t, image, text_slots=6),
        "sr": lambda t: sr_layout(vocab, t, lowres, highres, window=1, text_slots=6),
        "t2i prompt": lambda t: t2i_prompt(vocab, t, text_slots=6),
        "sr prompt": lambda t: sr_prompt(vocab, t, lowres, window=1, text_slots=6),
    }
    for name, build in builders.items():
        short, long = build([1]), build([1, 2, 3, 4, 5, 6])
        for layout in (short, long):
            n = sum(e - s for s, e, k in layout.spans if k == "text")
            assert layout.position_ids[:n + 1].tolist() == list(range(n + 1)), name
            assert layout.position_ids[n + 1:].tolist() == list(range(7, 7 + len(layout) - n - 1))
            assert layout.text_slots == 6
        # the same ids after the text sit at the same positions
        assert torch.equal(short.position_ids[2:], long.position_ids[7:]), name
        assert torch.equal(short.input_ids[2:], long.input_ids[7:]), name
    # a full 6-token caption is the sequential layout; prompts stay prefixes of layouts
    full = t2i_layout(vocab, [1, 2, 3, 4, 5, 6], image, text_slots=6)
    assert torch.equal(full.position_ids, torch.arange(len(full)))
    prompt, layout = t2i_prompt(vocab, [1, 2], text_slots=6), t2i_layout(vocab, [1, 2], image,
                                                                         text_slots=6)
    assert torch.equal(prompt.position_ids, layout.position_ids[:len(prompt)])


def test_caption_with_text_slots_gives_each_token_its_t2i_position(vocab):
    text, image = [1, 2, 3], [5, 6, 7, 8]
    t2i = t2i_layout(vocab, text, image, text_slots=6)
    caption = caption_layout(vocab, text, image, text_slots=6, end_token="[SEP]")
    where = {int(i): int(p) for i, p in zip(t2i.input_ids, t2i.position_ids)}
    for token, position in zip(caption.input_ids.tolist()[:-1], caption.position_ids.tolist()):
        assert where[token] == position, vocab.token_str(token)
    assert caption.position_ids.tolist() == [7, 8, 9, 10, 11, 12, 13, 0, 1, 2, 3, 4]
    prompt = caption_prompt(vocab, image, text_slots=6)
    assert torch.equal(prompt.position_ids, caption.position_ids[:len(prompt)])
    assert caption_layout(vocab, [1] * 9, image, text_slots=6).text_truncated == 3


def test_text_slots_cut_longer_captions_and_refuse_bad_values(vocab):
    layout = t2i_layout(vocab, [1, 2, 3, 4, 5], [5, 6], text_slots=3)
    assert layout.text_truncated == 2 and layout.position_ids.tolist() == list(range(9))
    assert t2i_layout(vocab, [1, 2, 3, 4, 5], [5], max_text_len=2, text_slots=3).text_truncated == 3
    with pytest.raises(ValueError, match=r"text_slots=.* must be an int >= 1"):
        t2i_layout(vocab, [1], [5], text_slots=0)
    assert text_slots_for(False, 64) is None and text_slots_for(True, 64) == 64
    with pytest.raises(ValueError, match="data.max_text_len is null"):
        text_slots_for(True, None, "data")


def test_truncation_counted(vocab):
    layout = t2i_layout(vocab, [1, 2, 3, 4, 5], [5, 6, 7, 8], max_text_len=2)
    assert layout.text_truncated == 3
    assert layout.input_ids.tolist()[:3] == [33, 17, 18] and len(layout) == 10
    assert t2i_layout(vocab, [1, 2], [5], max_text_len=2).text_truncated == 0
    assert t2i_prompt(vocab, [1, 2, 3], max_text_len=1).text_truncated == 2


def test_empty_caption(vocab):
    builders = [lambda t: t2i_layout(vocab, t, [1, 2]), lambda t: caption_layout(vocab, t, [1, 2]),
                lambda t: sr_layout(vocab, t, [1], [1, 2, 3, 4]), lambda t: t2i_prompt(vocab, t),
                lambda t: sr_prompt(vocab, t, [1])]
    for builder in builders:
        with pytest.raises(ValueError, match="caption is empty"):
            builder([])
    # classifier-free-guidance caption dropout
    dropped = t2i_layout(vocab, [], [5, 6], allow_empty_text=True)
    assert dropped.input_ids.tolist() == [33, 42, 27, 5, 6, 30]
    assert dropped.spans == [(3, 5, "image")] and not dropped.text_mask.any()


def test_bad_codes_and_text_ids(vocab):
    with pytest.raises(ValueError, match="code 16 at index 3"):
        t2i_layout(vocab, [1], [0, 1, 2, 16])
    with pytest.raises(ValueError, match="code -1"):
        caption_layout(vocab, [1], torch.tensor([[0, -1], [2, 3]]))
    with pytest.raises(ValueError, match="high-res image codes: code 99"):
        sr_layout(vocab, [1], [1, 2], [0, 99])
    with pytest.raises(ValueError, match="integers"):
        t2i_layout(vocab, [1], torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="tokenizer text id 10"):
        t2i_layout(vocab, [1, 10], [1, 2])


def test_extract_and_decode(vocab):
    tok = CharTokenizer()
    big = CogViewVocab.for_tokenizer(tok, num_image_codes=16)
    text_ids = tok.encode("中间有一个大的红色圆形")
    layout = t2i_layout(big, text_ids, [3, 1, 4, 1, 5, 9])
    assert extract_image_codes(big, layout.input_ids).tolist() == [3, 1, 4, 1, 5, 9]
    assert extract_text_ids(big, layout.input_ids).tolist() == text_ids
    assert decode_text(big, tok, layout.input_ids) == "中间有一个大的红色圆形"
    cap = caption_layout(big, text_ids, [3, 1, 4, 1], end_token="[SEP]")
    assert extract_text_ids(big, cap.input_ids).tolist() == text_ids
    assert decode_text(big, tok, cap.input_ids.tolist()) == "中间有一个大的红色圆形"
    sr = sr_layout(vocab, [1], [1, 2, 3, 4], list(range(16)))
    assert extract_image_codes(vocab, sr.input_ids, which=2).tolist() == list(range(16))
    assert extract_image_codes(vocab, sr.input_ids, which=1).tolist() == [1, 2, 3, 4]
    # a generation that stopped before [EOI1] still yields its codes
    unfinished = t2i_layout(vocab, [1], [7, 8, 9]).input_ids[:-2]
    assert extract_image_codes(vocab, unfinished).tolist() == [7, 8]
    with pytest.raises(ValueError, match="BOI2"):
        extract_image_codes(vocab, layout.input_ids[:3], which=2)


def test_collate_layouts(vocab):
    short = t2i_layout(vocab, [1], [5, 6])  # 7 tokens
    long = t2i_layout(vocab, [1, 2, 3], [5, 6, 7, 8], max_text_len=2)  # 10 tokens, 1 truncated
    batch = collate_layouts([short, long], pad_id=vocab.pad_id)
    assert batch["input_ids"].shape == (2, 10)
    assert batch["input_ids"][0].tolist() == short.input_ids.tolist() + [26] * 3
    assert batch["attention_mask"].tolist() == [[True] * 7 + [False] * 3, [True] * 10]
    assert not batch["loss_mask"][0, 7:].any() and not batch["text_mask"][0, 7:].any()
    assert torch.equal(batch["loss_mask"][1], long.loss_mask)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 0, 0]
    assert batch["text_truncated"].tolist() == [0, 1]
    fixed = collate_layouts([short], pad_id=vocab.pad_id, pad_to=12)
    assert fixed["input_ids"].shape == (1, 12) and fixed["attention_mask"].sum() == 7
    left = collate_layouts([short, long], pad_id=vocab.pad_id, padding_side="left")
    assert left["input_ids"][0].tolist() == [26] * 3 + short.input_ids.tolist()
    assert left["position_ids"][0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="pad_to=5 is shorter"):
        collate_layouts([short, long], pad_id=vocab.pad_id, pad_to=5)
