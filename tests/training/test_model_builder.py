"""training.model: the seed's network, layer by layer, and the optional CNN's interface."""

import keras
import numpy as np
import pytest

from training.model import HIDDEN_LAYER, OUTPUT_LAYER, build_model


def test_mlp_is_the_seed_network():
    model = build_model()
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.name for layer in model.layers] == [HIDDEN_LAYER, OUTPUT_LAYER] == [d.name for d in dense]
    assert [d.units for d in dense] == [512, 10]
    assert [d.activation.__name__ for d in dense] == ["relu", "softmax"]
    assert model.input_shape == (None, 784) and model.output_shape == (None, 10)
    assert model.count_params() == 407_050 == 784 * 512 + 512 + 512 * 10 + 10
    assert model.loss == "categorical_crossentropy"
    assert isinstance(model.optimizer, keras.optimizers.RMSprop)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.001)
    compiled = model.get_compile_config()
    assert compiled["loss"] == "categorical_crossentropy" and compiled["metrics"] == ["accuracy"]
    assert compiled["optimizer"]["class_name"] == "RMSprop"


def test_learning_rate_override():
    assert float(build_model(learning_rate=0.01).optimizer.learning_rate) == pytest.approx(0.01)


def test_cnn_has_the_same_flat_interface():
    model = build_model("cnn")
    assert model.input_shape == (None, 784) and model.output_shape == (None, 10)
    assert model.get_layer(HIDDEN_LAYER).units == 128
    probs = model.predict(np.random.default_rng(0).random((3, 784), dtype=np.float32), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'rnn'"):
        build_model("rnn")
