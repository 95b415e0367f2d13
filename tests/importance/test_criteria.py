"""Known-answer tests for the criteria and the statistics collectors."""

from __future__ import annotations

import copy

import pytest
import torch
from checks import labelled
from tiny_models import FAMILIES, build_tiny

from vlmprune import calibrate
from vlmprune.adapters import get_adapter
from vlmprune.importance import layer as layer_criteria
from vlmprune.importance import width as width_criteria
from vlmprune.importance.structures import layer_params
from vlmprune.summary import layer_shapes


def attention_out(adapter, layer):
    """The attention's output projection (Qwen3.5's linear attention: out_proj)."""
    attn = adapter.attention(layer)
    return getattr(attn, adapter.layout.o) if hasattr(attn, adapter.layout.o) else attn.out_proj


def make_identity_(model, index):
    """Zero the layer's residual writes (o_proj/dense and down/fc2, with biases): output == input."""
    adapter = get_adapter(model)
    layer = adapter.layers(model)[index]
    with torch.no_grad():
        # (Gemma 4 layers also write their per-layer input through per_layer_projection)
        writers = [attention_out(adapter, layer), getattr(adapter.mlp(layer), adapter.layout.down)]
        for module in writers + ([layer.per_layer_projection] if hasattr(layer, "per_layer_projection") else []):
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()


def pad_right(batch, extra=5):
    """The same batch with ``extra`` padding positions appended (mask 0, no label)."""
    out = dict(batch)
    b = batch["input_ids"].shape[0]
    out["input_ids"] = torch.cat([batch["input_ids"], torch.zeros(b, extra, dtype=torch.long)], 1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(b, extra, dtype=torch.long)], 1)
    out["labels"] = torch.cat([batch["labels"], torch.full((b, extra), -100)], 1)
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in batch:
            out[key] = torch.cat([batch[key], torch.zeros(b, extra, dtype=batch[key].dtype)], 1)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_layer_is_least_important(family):
    model = build_tiny(family)
    make_identity_(model, 2)
    adapter = get_adapter(model)
    with torch.no_grad():
        # every other layer writes strongly into the residual stream, and predictions are confident:
        # skipping any of them moves the answers away from the intact model's own predictions
        for i, layer in enumerate(adapter.layers(model)):
            if i != 2:
                getattr(adapter.mlp(layer), adapter.layout.down).weight.mul_(20)
                attention_out(adapter, layer).weight.mul_(20)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight * 100)  # (unties embeddings)
    batches = [labelled(model, family)]
    hs = calibrate.collect_hidden_states(model, batches)
    assert int(layer_criteria.block_influence(hs).argmin()) == 2
    assert int(layer_criteria.angular(hs).argmin()) == 2
    assert layer_criteria.angular_block(hs, 1)[0] == 2
    assert int(layer_criteria.skip_loss(calibrate.collect_skip_losses(model, batches)).argmin()) == 2
    assert layer_criteria.last(4).argsort()[:1].tolist() == [3]


def reference_taylor(model, batches):
    """|W * dL/dW| per structure from full autograd gradients, summed over batches (independent code)."""
    adapter = get_adapter(model)
    lay = adapter.layout
    shapes = layer_shapes(model, adapter)
    heads = [torch.zeros(s.num_heads, dtype=torch.float64) for s in shapes]
    kv = [torch.zeros(s.num_kv_heads, dtype=torch.float64) for s in shapes]
    ch = [torch.zeros(s.intermediate_size, dtype=torch.float64) for s in shapes]
    for batch in batches:
        model.zero_grad()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 batch["labels"][:, 1:].reshape(-1))
        loss.backward()
        for i, layer in enumerate(adapter.layers(model)):
            s, d = shapes[i], shapes[i].head_dim
            attn, mlp = adapter.attention(layer), adapter.mlp(layer)
            t = lambda m: (m.weight * m.weight.grad).abs().double()  # noqa: E731
            tb = lambda m: (m.bias * m.bias.grad).abs().double() if m.bias is not None else None  # noqa: E731
            if lay.qkv:
                full = t(getattr(attn, lay.qkv)).sum(1)
                q_end, k_end = s.num_heads * d, (s.num_heads + s.num_kv_heads) * d
                q_rows, k_rows, v_rows = full[:q_end], full[q_end:k_end], full[k_end:]
            else:
                q_rows, k_rows, v_rows = (t(getattr(attn, n)).sum(1) for n in (lay.q, lay.k, lay.v))
                for name, rows in ((lay.q, "q"), (lay.k, "k"), (lay.v, "v")):
                    b = tb(getattr(attn, name))
                    if b is not None:
                        if rows == "q":
                            q_rows = q_rows + b
                        elif rows == "k":
                            k_rows = k_rows + b
                        else:
                            v_rows = v_rows + b
            o_cols = t(getattr(attn, lay.o)).sum(0)
            for h in range(s.num_heads):
                heads[i][h] += q_rows[h * d : (h + 1) * d].sum() + o_cols[h * d : (h + 1) * d].sum()
            for g in range(s.num_kv_heads):
                kv[i][g] += k_rows[g * d : (g + 1) * d].sum() + v_rows[g * d : (g + 1) * d].sum()
            if lay.gate_up:
                gu = t(getattr(mlp, lay.gate_up)).sum(1)
                rows = gu[: s.intermediate_size] + gu[s.intermediate_size :]
            else:
                rows = sum(t(getattr(mlp, n)).sum(1) + (tb(getattr(mlp, n)) if getattr(mlp, n).bias is not None else 0)
                           for n in lay.channel_projections())
            ch[i] += rows + t(getattr(mlp, lay.down)).sum(0)
    groups = [k + h.reshape(len(k), -1).sum(-1) for k, h in zip(kv, heads)]
    return heads, groups, ch


@pytest.mark.parametrize("family", ["llava_llama_gqa", "llava_phi", "llava_phi3", "qwen2_vl"])
def test_taylor_equals_full_autograd_reference(family):
    model = build_tiny(family)
    batches = [labelled(model, family, seed=0), labelled(model, family, seed=1)]
    scores = width_criteria.taylor(calibrate.collect_taylor(model, batches, tokens="answer"), layer_shapes(model))
    assert all(p.grad is None for p in model.parameters())
    heads, groups, channels = reference_taylor(copy.deepcopy(model), batches)
    for got, want in ((scores.heads, heads), (scores.groups, groups), (scores.channels, channels)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-10)


def test_taylor_warns_when_a_few_batches_carry_the_scores(caplog):
    """A model that already predicts its calibration answers has near-zero loss and gradient on
    them; one batch of wrong answers then decides the scores, and the user is told."""
    model = build_tiny("llava_llama_gqa")
    with torch.no_grad():
        model.lm_head.weight.mul_(500)  # confident predictions: own-prediction labels cost ~0
    confident = [labelled(model, "llava_llama_gqa", seed=s) for s in range(4)]
    wrong = labelled(model, "llava_llama_gqa", seed=4)
    real = wrong["labels"] != -100
    wrong["labels"][real] = (wrong["labels"][real] + 1) % model.config.text_config.vocab_size
    with caplog.at_level("WARNING", logger="vlmprune.calibrate"):
        calibrate.collect_taylor(model, confident, tokens="answer")
    assert not caplog.records
    with caplog.at_level("WARNING", logger="vlmprune.calibrate"):
        calibrate.collect_taylor(model, confident + [wrong], tokens="answer")
    assert len(caplog.records) == 1 and "--tokens text" in caplog.text


def test_activation_and_wanda_equal_hand_computed_values():
    model = build_tiny("llava_llama_gqa")
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    del layers[2:]  # a two-layer toy
    model.config.text_config.num_hidden_layers = 2
    batch = labelled(model, "llava_llama_gqa")
    seen = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("o", i), a[0]))
             for i, layer in enumerate(layers)]
    hooks += [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("d", i), a[0]))
              for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    for h in hooks:
        h.remove()
    mask = batch["attention_mask"].bool()
    shapes = layer_shapes(model)
    stats = calibrate.collect_activations(model, [batch], tokens="all")
    act = width_criteria.activation(stats, shapes)
    wanda = width_criteria.wanda(stats, [x.self_attn.o_proj.weight for x in layers],
                                 [x.mlp.down_proj.weight for x in layers], shapes)
    for i, s in enumerate(shapes):
        o = seen[("o", i)][mask].double()          # [N, H*d]
        d = seen[("d", i)][mask].double()          # [N, I]
        head_abs = o.abs().mean(0).reshape(s.num_heads, s.head_dim).mean(-1)
        torch.testing.assert_close(act.heads[i], head_abs)
        torch.testing.assert_close(act.channels[i], d.abs().mean(0))
        torch.testing.assert_close(act.groups[i], head_abs.reshape(s.num_kv_heads, -1).sum(-1))
        w_o = layers[i].self_attn.o_proj.weight.detach().double().abs().sum(0)
        head_w = (w_o * o.norm(dim=0)).reshape(s.num_heads, s.head_dim).sum(-1)
        torch.testing.assert_close(wanda.heads[i], head_w)
        w_d = layers[i].mlp.down_proj.weight.detach().double().abs().sum(0)
        torch.testing.assert_close(wanda.channels[i], w_d * d.norm(dim=0))


@pytest.mark.parametrize("family", ["llava_llama_gqa", "qwen2_vl", "gemma3"])
def test_padding_never_changes_a_score(family):
    model = build_tiny(family)
    batch = labelled(model, family)
    padded = pad_right(batch)
    shapes = layer_shapes(model)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # noqa: E731
    a, b = (calibrate.collect_hidden_states(model, [x]) for x in (batch, padded))
    assert a.tokens == b.tokens
    close(layer_criteria.block_influence(a), layer_criteria.block_influence(b))
    close(layer_criteria.angular(a), layer_criteria.angular(b))
    close(layer_criteria.skip_loss(calibrate.collect_skip_losses(model, [batch])),
          layer_criteria.skip_loss(calibrate.collect_skip_losses(model, [padded])))
    for x, y in zip(width_criteria.taylor(calibrate.collect_taylor(model, [batch]), shapes).channels,
                    width_criteria.taylor(calibrate.collect_taylor(model, [padded]), shapes).channels):
        close(x, y)
    for x, y in zip(calibrate.collect_activations(model, [batch]), calibrate.collect_activations(model, [padded])):
        close(x.o_abs, y.o_abs)
        close(x.down_sq, y.down_sq)
        assert x.tokens == y.tokens


def test_magnitude_and_random():
    model = build_tiny("llava_phi")
    adapter = get_adapter(model)
    shapes = layer_shapes(model)
    params = [(role, p) for i, layer in enumerate(adapter.layers(model))
              for p, role in layer_params(layer, adapter, i, shapes[i]).items()]
    m1 = width_criteria.magnitude(params, shapes, p=1)
    layer = adapter.layers(model)[1]
    fc1, fc2 = layer.mlp.fc1, layer.mlp.fc2
    expected = fc1.weight.abs().sum(1) + fc1.bias.abs() + fc2.weight.abs().sum(0)
    torch.testing.assert_close(m1.channels[1], expected.double().detach())
    m2 = width_criteria.magnitude(params, shapes, p=2)
    expected2 = (fc1.weight.pow(2).sum(1) + fc1.bias.pow(2) + fc2.weight.pow(2).sum(0)).sqrt()
    torch.testing.assert_close(m2.channels[1], expected2.double().detach())
    r1, r2, r3 = width_criteria.random(shapes, 1), width_criteria.random(shapes, 1), width_criteria.random(shapes, 2)
    assert torch.equal(r1.channels[0], r2.channels[0]) and not torch.equal(r1.channels[0], r3.channels[0])


def test_magnitude_owns_the_right_weights_gqa():
    """Llama with grouped-query attention, by hand: a channel owns its gate and up rows and its down
    column; a q head its q rows and o columns; a kv group its k and v rows plus its q heads; the
    norms and the embeddings belong to no structure (issue 22: magnitude worse than random was
    checked against this attribution and against LLM-Pruner's 'l1' vector criterion)."""
    model = build_tiny("llava_llama_gqa")
    adapter = get_adapter(model)
    shapes = layer_shapes(model)
    params = [(role, p) for i, layer in enumerate(adapter.layers(model))
              for p, role in layer_params(layer, adapter, i, shapes[i]).items()]
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any("norm" in names[id(p)] or "embed" in names[id(p)] for _, p in params)
    scores = width_criteria.magnitude(params, shapes, p=1)
    s = shapes[1]
    assert s.group_size > 1  # the test means GQA
    layer = adapter.layers(model)[1]
    attn, mlp = layer.self_attn, layer.mlp
    d = s.head_dim
    with torch.no_grad():
        channels = (mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1)
                    + mlp.down_proj.weight.abs().sum(0))
        heads = (attn.q_proj.weight.abs().reshape(s.num_heads, d, -1).sum((1, 2))
                 + attn.o_proj.weight.abs().reshape(-1, s.num_heads, d).sum((0, 2)))
        kv = sum(w.abs().reshape(s.num_kv_heads, d, -1).sum((1, 2)) for w in (attn.k_proj.weight, attn.v_proj.weight))
        groups = kv + heads.reshape(s.num_kv_heads, s.group_size).sum(1)
    for got, want in ((scores.channels[1], channels), (scores.heads[1], heads), (scores.groups[1], groups)):
        torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-5)  # float32 sums, summed in another order


def test_magnitude_warns_that_it_is_a_baseline(caplog):
    from vlmprune.prune.run import score

    with caplog.at_level("WARNING", logger="vlmprune"):
        score(build_tiny("llava_llama_gqa"), "width", "magnitude")
    assert "without data: a baseline" in caplog.text and "docs/performance/perplexity.md" in caplog.text


def test_wanda_column_sums_are_bit_identical_to_the_plain_expression():
    """Wanda's |W| column sums go through one reused float64 buffer (no per-layer copies that fragment
    the heap); they must be exactly what ``w.abs().double().sum(0)`` gives, whatever the call order."""
    from vlmprune.importance.width import _ColumnL1

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen) for shape in ((64, 128), (128, 64), (64, 64), (96, 160), (64, 128))]
    weights.append(torch.randn(64, 128, generator=gen).to(torch.bfloat16))
    column_l1 = _ColumnL1()
    for w in weights:
        got = column_l1(w)
        assert got.dtype == torch.float64 and torch.equal(got, w.abs().double().sum(0))
