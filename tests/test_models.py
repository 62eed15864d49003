import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bptt_jax.bptt import count_params
from bptt_jax.elements import DESCRIPTOR_NAMES, descriptor_table, period_group
from bptt_jax.models import ADAPT, PRESETS, ResMLP, StepHead, build_model
from bptt_jax.structures import Batch
from conftest import rattled_si

KEY = jax.random.PRNGKey(0)


def _batch(si_pairs, **kw):
    return Batch.from_structures([s for s, _ in si_pairs], [t for _, t in si_pairs], **kw)


@pytest.mark.parametrize("name", ["adapt", "resmlp"])
def test_shapes_and_padding_zero(si_pairs, name):
    model = build_model(name, "tiny")
    batch = _batch(si_pairs, batch_size=4)
    params = model.init(KEY, batch)
    out = model.apply(params, batch)
    assert out.shape == (4, 8, 3)
    assert np.all(np.asarray(out)[~np.asarray(batch.atom_mask)] == 0)
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("name", ["adapt", "resmlp"])
def test_padding_does_not_change_real_atoms(si_pairs, name):
    model = build_model(name, "tiny")
    small = _batch(si_pairs, batch_size=3)
    big = _batch(si_pairs, batch_size=5, n_atoms=16)
    # Padding atoms moved anywhere must not matter either.
    noise = jax.random.normal(KEY, big.positions.shape) * 7.0
    big = big.replace(positions=jnp.where(big.atom_mask[..., None], big.positions, noise))
    params = model.init(KEY, small)
    a = np.asarray(model.apply(params, small))
    b = np.asarray(model.apply(params, big))
    mask = np.asarray(small.atom_mask)
    np.testing.assert_allclose(b[:3, :8][mask], a[mask], atol=1e-5)


def test_adapt_permutation_equivariance(si_pairs):
    model = build_model("adapt", "tiny")
    s, t = si_pairs[1]
    batch = Batch.from_structures([s])
    params = model.init(KEY, batch)
    perm = np.random.default_rng(0).permutation(len(s))
    s_perm = type(s)(s.positions[perm], s.numbers[perm], s.cell, s.pbc, s.masses[perm], s.fixed[perm])
    f = np.asarray(model.apply(params, batch))[0, :len(s)]
    f_perm = np.asarray(model.apply(params, Batch.from_structures([s_perm])))[0, :len(s)]
    np.testing.assert_allclose(f_perm, f[perm], atol=1e-5)


def test_periodic_features_see_lattice_translations():
    s, _ = rattled_si(cubic=True)
    moved = type(s)(s.positions.copy(), s.numbers, s.cell, s.pbc)
    moved.positions[3] += s.cell[0] + s.cell[2]
    batch = Batch.from_structures([s, moved])
    for coords, same in [("periodic", True), ("cartesian", False)]:
        model = ADAPT(d_model=16, n_layers=1, n_heads=2, ffn_dim=16, coords=coords)
        f = np.asarray(model.apply(model.init(KEY, batch), batch))
        assert np.allclose(f[0], f[1], atol=1e-5) == same


def _adapt_count(d, layers, f, s, n_feat, n_species=119):
    embed = n_feat * d + d + 2 * (d * d + d)
    block = 4 * d * d + 4 * d + 6 * d + 2 * d * f + f + d
    return n_species * s + embed + layers * block + 3 * d + 3


def test_adapt_parameter_counts(si_pairs):
    batch = _batch(si_pairs)
    n_desc = len(DESCRIPTOR_NAMES)
    for preset in ("tiny", "small", "paper"):
        cfg = PRESETS["adapt"][preset]
        s = cfg.get("species_dim", 16)
        model = build_model("adapt", preset)
        shapes = jax.eval_shape(model.init, KEY, batch)
        expected = _adapt_count(cfg["d_model"], cfg["n_layers"], cfg["ffn_dim"], s, 3 + s + n_desc + 1)
        assert count_params(shapes) == expected, preset
    # The ADAPT release's size: d_model 256, 8 layers, FFN 512 is about 4.2 M parameters.
    assert 4.0e6 < count_params(jax.eval_shape(build_model("adapt", "paper").init, KEY, batch)) < 4.4e6


def test_resmlp_parameter_count(si_pairs):
    batch = _batch(si_pairs)
    m, w, k, n_feat = 16, 32, 2, 3 + len(DESCRIPTOR_NAMES) + 1
    model = ResMLP(max_atoms=m, width=w, n_blocks=k)
    expected = (m * n_feat * w + w) + (k - 1) * (w * w + w) + k * (w * w + 2 * w) + w * m * 3
    assert count_params(jax.eval_shape(model.init, KEY, batch)) == expected
    with pytest.raises(ValueError, match="max_atoms"):
        ResMLP(max_atoms=4, width=8, n_blocks=1).init(KEY, batch)


def test_resmlp_input_norm_standardizes_and_is_not_trained(si_pairs):
    from bptt_jax.models.resmlp import fit_input_stats

    model = build_model("resmlp", "tiny", input_norm=True, coords="periodic")
    batch = _batch(si_pairs, batch_size=4, n_atoms=8)
    params = fit_input_stats(model, model.init(KEY, batch), [batch])
    x = np.asarray(model.apply(params, batch, inputs_only=True))[np.asarray(batch.structure_mask)]
    z = (x - np.asarray(params["input_stats"]["mean"])) / np.asarray(params["input_stats"]["std"])
    varies = x.std(0) > 0.1
    assert varies.sum() > 10  # the rattled coordinates
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z[:, varies].std(0), 1.0, rtol=1e-3)
    np.testing.assert_allclose(z[:, x.std(0) == 0], 0.0, atol=1e-6)  # padding slots, one element's descriptors
    # The statistics are constants: no gradient reaches them; the forces do depend on them.
    g = jax.grad(lambda p: jnp.sum(model.apply(p, batch) ** 2))(params)
    assert float(jnp.abs(g["input_stats"]["mean"]).max()) == 0.0
    assert float(jnp.abs(g["params"]["out"]["kernel"]).sum()) > 0
    shifted = dict(params, input_stats={"mean": params["input_stats"]["mean"] + 1.0,
                                        "std": params["input_stats"]["std"]})
    assert not np.allclose(np.asarray(model.apply(shifted, batch)), np.asarray(model.apply(params, batch)))
    # A model without input_norm is returned unchanged.
    plain = build_model("resmlp", "tiny")
    p0 = plain.init(KEY, batch)
    assert fit_input_stats(plain, p0, [batch]) is p0


@pytest.mark.parametrize("output", ["linear", "exp", "softplus"])
def test_step_head_constant_output_init(si_pairs, output):
    batch = _batch(si_pairs, batch_size=4)
    head = StepHead(d_model=16, n_heads=2, ffn_dim=16, init_step=0.077, output=output)
    forces = jax.random.normal(KEY, batch.positions.shape)
    params = head.init(KEY, batch, forces)
    s = head.apply(params, batch, forces)
    assert s.shape == (4,)
    np.testing.assert_allclose(np.asarray(s), 0.077, rtol=1e-5)
    # It is trainable: the output layer gets a non-zero gradient.
    g = jax.grad(lambda p: jnp.sum(head.apply(p, batch, forces) ** 2))(params)
    assert float(jnp.abs(g["params"]["out"]["kernel"]).sum()) > 0


def test_dropout_only_when_asked(si_pairs):
    batch = _batch(si_pairs)
    model = build_model("adapt", "tiny", dropout=0.5)
    params = model.init(KEY, batch)
    a = model.apply(params, batch)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(model.apply(params, batch)))
    b = model.apply(params, batch, deterministic=False, rngs={"dropout": KEY})
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_elements_table():
    assert period_group(14) == (3, 14, False) and period_group(26) == (4, 8, False)
    assert period_group(79) == (6, 11, False) and period_group(58) == (6, 3, True)
    table = descriptor_table()
    assert table.shape == (119, len(DESCRIPTOR_NAMES)) and np.all(table[0] == 0)
    with pytest.raises(ValueError):
        build_model("gnn")
    with pytest.raises(ValueError):
        build_model("adapt", "huge")


@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_matches_flax(with_bias):
    """bptt_jax's heads-major attention is flax's dot_product_attention (and SelfAttention, with the same
    parameters, flax's MultiHeadDotProductAttention), with a key-padding mask and an additive bias."""
    import flax.linen as nn

    from bptt_jax.models.layers import SelfAttention, attention

    ks = jax.random.split(jax.random.PRNGKey(3), 5)
    q, k, v = (jax.random.normal(kk, (2, 7, 3, 4)) for kk in ks[:3])
    valid = jnp.array([[True] * 7, [True] * 5 + [False] * 2])
    mask = nn.make_attention_mask(valid, valid)
    bias = jax.random.normal(ks[3], (2, 3, 7, 7)) if with_bias else None
    ours = attention(q, k, v, bias=bias, mask=mask)
    ref = nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    x = jax.random.normal(ks[4], (2, 7, 12))
    mha = nn.MultiHeadDotProductAttention(num_heads=3, qkv_features=12, out_features=12, deterministic=True)
    variables = mha.init(jax.random.PRNGKey(0), x, x, mask=mask)
    mine = SelfAttention(num_heads=3, qkv_features=12, out_features=12)
    assert jax.tree_util.tree_structure(mine.init(jax.random.PRNGKey(0), x, mask)) == \
        jax.tree_util.tree_structure(variables)
    np.testing.assert_allclose(mine.apply(variables, x, mask), mha.apply(variables, x, x, mask=mask),
                               rtol=1e-5, atol=1e-6)
    # gradients too (BPTT differentiates through it)
    g1 = jax.grad(lambda q: jnp.sum(jnp.sin(attention(q, k, v, bias=bias, mask=mask))))(q)
    g2 = jax.grad(lambda q: jnp.sum(jnp.sin(nn.dot_product_attention(q, k, v, bias=bias, mask=mask))))(q)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)


def test_step_head_random_init_varies_around_the_starting_step(si_pairs):
    batch = Batch.from_structures([s for s, _ in si_pairs], batch_size=4)
    forces = jax.random.normal(KEY, batch.positions.shape) * batch.atom_mask[..., None]
    head = StepHead(d_model=16, n_heads=2, ffn_dim=16, init_step=0.077, output="exp", output_init="random")
    out = np.asarray(head.apply(head.init(KEY, batch, forces), batch, forces))[:3]
    assert np.all(out > 0) and np.ptp(out) > 1e-3, out  # not a constant output
    assert np.all(np.abs(np.log(out / 0.077)) < 4.0), out  # around the starting step
    with pytest.raises(ValueError, match="step-head output_init"):
        StepHead(output_init="zeros").init(KEY, batch, forces)
