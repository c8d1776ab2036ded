"""Cases for fastai's applications: vision (classification with batch transforms, segmentation), text
(AWD-LSTM language model then classifier, a transformer-style model), collab (dot and neural)."""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from fastai.callback.all import BnFreeze, ChannelsLast, CutMix, MixUp
from fastai.collab import CollabDataLoaders, collab_learner
from fastai.text.all import (AWD_LSTM, TextDataLoaders, awd_lstm_clas_config, awd_lstm_lm_config,
                             language_model_learner, text_classifier_learner)
from fastai.vision.all import (Dice, Learner, accuracy, resnet18, rmse, unet_learner, vision_learner)
from torch import nn

from data import image_dls, ratings_df, segmentation_dls, text_df
from registry import case, digest

OUT = Path(os.environ.get("FL_CONF_OUT", "."))
SMALL = dict(emb_sz=32, n_hid=64, n_layers=2)


def lm_config(): return {**awd_lstm_lm_config, **SMALL}
def clas_config(): return {**awd_lstm_clas_config, **SMALL}


def vision(cbs=()):
    return vision_learner(image_dls(), resnet18, pretrained=False, metrics=accuracy, cbs=list(cbs), path=OUT)


def vision_probes(learn) -> dict:
    preds, _ = learn.get_preds()
    return {"preds": digest(preds), "n": len(preds)}


@case("vision_mixup", ["vision_learner with batch transforms", "MixUp", "BnFreeze", "fine_tune", "tta"],
      final=vision, probes=vision_probes)
def vision_mixup():
    learn = vision([MixUp(), BnFreeze()])
    learn.fine_tune(1, 1e-3, freeze_epochs=1)
    fit_values = [[float(v) for v in row] for row in learn.recorder.values]
    tta_preds, _ = learn.tta(n=2)  # like validate, it starts the recorder afresh
    learn.conformance = {"same": {"tta": digest(tta_preds)}, "values": fit_values}
    return learn


@case("vision_cutmix_channels_last", ["CutMix", "ChannelsLast"], final=vision)
def vision_cutmix_channels_last():
    learn = vision([CutMix(), ChannelsLast()])
    learn.fit_one_cycle(1, 1e-3)
    return learn


PRECISION_NOTE = ("on CPU ranks autocast runs on the CPU (fastai alone turns it off there; RNNs stay in fp32): "
                  "checked against one process with the same autocast (`fastlaunch --cpu 1`)")


@case("vision_fp16", ["MixedPrecision (to_fp16)"], final=lambda: vision().to_fp16(), note=PRECISION_NOTE)
def vision_fp16():
    learn = vision().to_fp16()
    learn.fit_one_cycle(1, 1e-3)
    return learn


@case("vision_bf16", ["MixedPrecision (to_bf16)"], final=lambda: vision().to_bf16(), note=PRECISION_NOTE)
def vision_bf16():
    learn = vision().to_bf16()
    learn.fit_one_cycle(1, 1e-3)
    return learn


def unet():
    return unet_learner(segmentation_dls(), resnet18, pretrained=False, metrics=Dice(), path=OUT, n_out=2)


@case("unet_segmentation", ["unet_learner segmentation"], final=unet)
def unet_segmentation():
    learn = unet()
    learn.fit_one_cycle(1, 1e-3)
    return learn


def _text_dls():
    df = text_df()
    lm = TextDataLoaders.from_df(df, text_col="text", is_lm=True, valid_col="is_valid", bs=16, seq_len=24)
    clas = TextDataLoaders.from_df(df, text_col="text", label_col="label", valid_col="is_valid", text_vocab=lm.vocab,
                                   bs=16, seq_len=24)
    return lm, clas


def language_model():
    lm, _ = _text_dls()
    return language_model_learner(lm, AWD_LSTM, pretrained=False, config=lm_config(), metrics=accuracy, path=OUT)


@case("text_language_model", ["language_model_learner (AWD-LSTM)"], final=language_model)
def text_language_model():
    learn = language_model()
    learn.fit_one_cycle(1, 1e-2)
    return learn


def text_classifier():
    _, clas = _text_dls()
    return text_classifier_learner(clas, AWD_LSTM, pretrained=False, config=clas_config(), metrics=accuracy, path=OUT)


@case("text_awd_lstm", ["language_model_learner + fine_tune", "text_classifier_learner (AWD-LSTM)"],
      final=text_classifier)
def text_awd_lstm():
    lm_dls, clas_dls = _text_dls()
    lm = language_model_learner(lm_dls, AWD_LSTM, pretrained=False, config=lm_config(), metrics=accuracy, path=OUT)
    lm.fine_tune(1, 1e-2)
    lm.save_encoder("enc")
    learn = text_classifier_learner(clas_dls, AWD_LSTM, pretrained=False, config=clas_config(), metrics=accuracy, path=OUT)
    learn.load_encoder("enc")
    learn.fit_one_cycle(1, 1e-2)
    return learn


def text_classifier_fp16():
    return text_classifier().to_fp16()


@case("text_awd_lstm_fp16", ["MixedPrecision (to_fp16) on an AWD-LSTM"], final=text_classifier_fp16,
      note=PRECISION_NOTE)
def text_awd_lstm_fp16():
    lm_dls, clas_dls = _text_dls()
    lm = language_model_learner(lm_dls, AWD_LSTM, pretrained=False, config=lm_config(), metrics=accuracy,
                                path=OUT).to_fp16()
    lm.fine_tune(1, 1e-2)
    lm.save_encoder("enc16")
    learn = text_classifier_learner(clas_dls, AWD_LSTM, pretrained=False, config=clas_config(), metrics=accuracy,
                                    path=OUT).to_fp16()
    learn.load_encoder("enc16")
    learn.fit_one_cycle(1, 1e-2)
    return learn


class TinyTransformer(nn.Module):
    """A transformer-style text classifier, as users write around nn.TransformerEncoder."""

    def __init__(self, vocab: int, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.1)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)).mean(1))


def transformer():
    _, clas = _text_dls()
    return Learner(clas, TinyTransformer(len(clas.vocab[0])), loss_func=nn.CrossEntropyLoss(), metrics=accuracy,
                   path=OUT)


@case("text_transformer", ["a transformer-style text model (plain Learner)"], final=transformer)
def text_transformer():
    learn = transformer()
    learn.fit_one_cycle(1, 1e-3)
    return learn


def collab(use_nn: bool):
    dls = CollabDataLoaders.from_df(ratings_df(), bs=32, valid_pct=0.2, seed=42)
    extra = dict(use_nn=True, layers=[16]) if use_nn else {}
    return collab_learner(dls, n_factors=8, y_range=(0, 5.5), metrics=rmse, path=OUT, **extra)


@case("collab_dot", ["collab_learner (dot product)"], final=partial(collab, False))
def collab_dot():
    learn = collab(False)
    learn.fit_one_cycle(1, 5e-3)
    return learn


@case("collab_neural", ["collab_learner (use_nn)"], final=partial(collab, True))
def collab_neural():
    learn = collab(True)
    learn.fit_one_cycle(1, 5e-3)
    return learn
