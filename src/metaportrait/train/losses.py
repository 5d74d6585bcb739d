"""The generator's loss: one function from a batch of training pairs to named loss terms and their total.

Base training (`metaportrait.train.base`), the meta-learning inner loop (`metaportrait.meta.reptile`, through
`metaportrait.train.meta`) and personalisation (`metaportrait.personalize`) all compute the generator's loss
with `GeneratorLoss`, so a recipe's weights mean the same thing in all three. The critics' own updates stay in
`train_base`; `GeneratorLoss` only reads them (their gradients are switched off while the generator's terms are
computed) and hands back what their updates need (`GeneratorTerms.prediction`, `GeneratorTerms.mouth`).

Terms (each already multiplied by its weight of `LossWeights`; a weight of 0 leaves the term out):

``perceptual_warped``, ``l1_warped``, ``face_warped``     the warped source against the driving frame (both stages)
``perceptual_output``, ``l1_output``, ``l2_output``,
``face_output``, ``eye``, ``mouth``, ``identity``         the output against the driving frame (stage full)
``gan_g``, ``feature_matching``                           the multi-scale critic (stage full, with a critic)
``mouth_perceptual``, ``mouth_gan_g``,
``mouth_feature_matching``                                 mouth crops (stage full)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from metaportrait.config import ModelConfig
from metaportrait.data.pairs import REGIONS, box_crops, box_masks
from metaportrait.losses.perceptual import PerceptualPyramidLoss
from metaportrait.models.identity import cosine_distance
from metaportrait.train.config import LossWeights, Stage


@dataclass
class MouthCrops:
    """The mouth crops of a batch, for the mouth critic's update: ``(B, C, s, s)`` each, images in [0, 1]."""

    real: torch.Tensor  # driving frame
    fake: torch.Tensor  # output (with gradient)
    lines: torch.Tensor  # driving landmark lines
    region: torch.Tensor | None  # (B, 1, s, s) weight of the critic's patches; None: all equal


@dataclass
class GeneratorTerms:
    """What `GeneratorLoss` returns for one batch."""

    terms: dict[str, torch.Tensor]  # name -> weighted scalar term (module docstring)
    total: torch.Tensor  # their sum, the generator's loss
    out: dict[str, torch.Tensor]  # the generator's outputs (`Generator.forward`)
    prediction: torch.Tensor | None  # (B, 3, H, W) the output the losses judged (stage full), else None
    mouth: MouthCrops | None  # the mouth crops when a mouth term or critic is on, else None


class GeneratorLoss:
    """The generator's loss terms of a recipe (`LossWeights`) on batches of `metaportrait.data.pairs.make_pair`
    samples.

    Args:
        weights: the loss weights.
        model_cfg: the generator's config (identity input, prior masks, output kind).
        stage: ``"warp"`` (terms on the warped image only) or ``"full"``.
        size: side of the training images in pixels (the eye/mouth boxes are measured at it).
        backbone: the frozen perceptual feature extractor (shared by the three perceptual terms).
        identity_encoder: `IdentityEncoder`; needed in stage full when the model takes an identity or
            ``weights.identity`` > 0.
        discriminator: the multi-scale critic; needed when ``weights.gan`` or ``weights.feature_matching`` > 0.
        mouth_critic: `MouthDiscriminator`; needed when ``weights.mouth_gan`` > 0.
        mouth_critic_region: which patches of the mouth crop its LSGAN terms count ("crop" or "synthesised").

    Raises:
        ValueError: a term needs a network or model input that is not there.
    """

    def __init__(
        self,
        weights: LossWeights,
        model_cfg: ModelConfig,
        stage: Stage,
        size: int,
        backbone: nn.Module,
        identity_encoder: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        mouth_critic: nn.Module | None = None,
        mouth_critic_region: Literal["crop", "synthesised"] = "crop",
    ):
        full = stage == "full"
        if (weights.synthesis_pixel != 1.0 or mouth_critic_region == "synthesised") and not model_cfg.prior_masks:
            raise ValueError(
                "loss.synthesis_pixel != 1 and mouth_critic_region='synthesised' need a model with prior masks "
                "(they mark the synthesised band)"
            )
        if weights.eyelid_pixel is not None and not model_cfg.refine.eyelid_band:
            raise ValueError("loss.eyelid_pixel needs a model with the eyelid-band input (--eyelid-condition)")
        if full and (model_cfg.use_identity or weights.identity > 0) and identity_encoder is None:
            raise ValueError("stage full with an identity input or loss.identity > 0 needs an identity encoder")
        if full and (weights.gan > 0 or weights.feature_matching > 0) and discriminator is None:
            raise ValueError("loss.gan / loss.feature_matching > 0 need a discriminator")
        if full and weights.mouth_gan > 0 and mouth_critic is None:
            raise ValueError("loss.mouth_gan > 0 needs a mouth critic")
        self.weights, self.model_cfg, self.stage, self.size = weights, model_cfg, stage, size
        self.identity_encoder = identity_encoder
        self.discriminator = discriminator if full and (weights.gan > 0 or weights.feature_matching > 0) else None
        self.mouth_critic = mouth_critic if full and weights.mouth_gan > 0 else None
        self.mouth_critic_region = mouth_critic_region
        self.needs_identity = full and (model_cfg.use_identity or weights.identity > 0)
        self.mouth_crop = max(64, size // 4)  # px; the mouth box is about a quarter of the face crop wide
        device = next(backbone.parameters()).device
        # Two weightings of one backbone (the module is shared, not copied).
        scales = weights.pyramid_scales
        self.perceptual_warped = PerceptualPyramidLoss(backbone, scales, weights.perceptual_warped).to(device)
        self.perceptual_output = PerceptualPyramidLoss(backbone, scales, weights.perceptual_output).to(device)
        mouth_layers = (weights.mouth_perceptual,) * len(weights.perceptual_output)
        self.perceptual_mouth = PerceptualPyramidLoss(backbone, (1.0,), mouth_layers).to(device)
        # The official tanh output is trained on its raw value (clipping would cut the gradient below 0).
        self.output_key = "output_raw" if model_cfg.refine.output == "tanh" else "output"

    def __call__(self, generator: nn.Module, batch: dict[str, torch.Tensor]) -> GeneratorTerms:
        """The loss terms of ``generator`` on one batch (a collated `make_pair` dict, on the generator's device)."""
        w, full, size = self.weights, self.stage == "full", self.size
        source, driving = batch["source"], batch["driving"]
        losses: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            source_identity = (
                self.identity_encoder.embed(source, batch["source_landmarks"]) if self.needs_identity else None
            )
        out = generator(
            source, batch["source_lines"], batch["driving_lines"],
            identity=source_identity if full and self.model_cfg.use_identity else None,
            prior_grid=batch.get("prior_grid"), prior_masks=batch.get("prior_masks"), stage=self.stage,
        )  # fmt: skip
        warped = out["warped"]
        if any(w.perceptual_warped):  # all-zero layer weights: the term is left out (no backbone pass)
            losses["perceptual_warped"] = self.perceptual_warped(warped, driving)
        if w.l1_warped > 0:
            losses["l1_warped"] = w.l1_warped * (warped - driving).abs().mean()
        if w.face > 0:
            losses["face_warped"] = w.face * face_l1((warped - driving).abs(), batch["face_mask"])
        if not full:
            return GeneratorTerms(losses, sum(losses.values()), out, None, None)
        prediction = out[self.output_key]
        if any(w.perceptual_output):
            losses["perceptual_output"] = self.perceptual_output(prediction, driving)
        # Pixel error of the output, scaled by loss.synthesis_pixel where the source has no pixels (the squared
        # term: by its square).
        pixel_error = (prediction - driving).abs()  # (B, 3, H, W)
        if w.synthesis_pixel != 1.0 or w.eyelid_pixel is not None:
            pixel_error = pixel_error * synthesis_pixel_weight(
                batch["prior_masks"], w.synthesis_pixel, w.eyelid_pixel
            )
        if w.l1_output > 0:
            losses["l1_output"] = w.l1_output * pixel_error.mean()
        if w.l2_output > 0:
            losses["l2_output"] = w.l2_output * pixel_error.square().mean()
        if w.face > 0:
            losses["face_output"] = w.face * face_l1(pixel_error, batch["face_mask"])
        if w.eye > 0 or w.mouth > 0:
            masks = box_masks(batch["boxes"], size, size, size)  # (B, 3, H, W)
            error = pixel_error.mean(dim=1, keepdim=True)  # (B, 1, H, W)
            region = (error * masks).sum(dim=(2, 3)) / masks.sum(dim=(2, 3)).clamp_min(1.0)  # (B, 3)
            losses["eye"] = w.eye * region[:, : REGIONS.index("mouth")].mean()
            losses["mouth"] = w.mouth * region[:, REGIONS.index("mouth")].mean()
        if w.identity > 0:
            # The output is aligned for E_id with the driving landmarks: it should show them.
            output_identity = self.identity_encoder.embed(prediction, batch["driving_landmarks"])
            losses["identity"] = w.identity * cosine_distance(output_identity, source_identity).mean()
        if self.discriminator is not None:
            self.discriminator.requires_grad_(False)  # G's step must not leave gradients in D
            fake_scales = self.discriminator(prediction)
            with torch.no_grad():
                real_scales = self.discriminator(driving)
            self.discriminator.requires_grad_(True)
            gan, matching = generator_adversarial(fake_scales, real_scales)
            losses["gan_g"] = w.gan * gan
            losses["feature_matching"] = w.feature_matching * matching
        mouth = None
        if self.mouth_critic is not None or w.mouth_perceptual > 0:
            mouth_boxes = batch["boxes"][:, REGIONS.index("mouth")]
            real_mouth = box_crops(driving, mouth_boxes, size, self.mouth_crop)
            fake_mouth = box_crops(prediction, mouth_boxes, size, self.mouth_crop)
            mouth = MouthCrops(real_mouth, fake_mouth, None, None)
        if w.mouth_perceptual > 0:
            losses["mouth_perceptual"] = self.perceptual_mouth(fake_mouth, real_mouth)
        if self.mouth_critic is not None:
            mouth.lines = box_crops(batch["driving_lines"], mouth_boxes, size, self.mouth_crop)
            if self.mouth_critic_region == "synthesised":
                mouth.region = box_crops(batch["prior_masks"][:, 1:2], mouth_boxes, size, self.mouth_crop)
            self.mouth_critic.requires_grad_(False)
            fake_scales = [self.mouth_critic(fake_mouth, mouth.lines)]  # one scale
            with torch.no_grad():
                real_scales = [self.mouth_critic(real_mouth, mouth.lines)]
            self.mouth_critic.requires_grad_(True)
            gan, matching = generator_adversarial(fake_scales, real_scales, mouth.region)
            losses["mouth_gan_g"] = w.mouth_gan * gan
            if w.mouth_feature_matching > 0:
                losses["mouth_feature_matching"] = w.mouth_feature_matching * matching
        return GeneratorTerms(losses, sum(losses.values()), out, prediction, mouth)


def synthesis_pixel_weight(prior_masks: torch.Tensor, weight: float, eyelid_weight: float | None = None) -> torch.Tensor:
    """Per-pixel weight of the pixel losses: ``weight`` inside the band the model must synthesise (prior-mask
    channel 1, where the source has no pixels), 1 elsewhere. ``(B, C >= 2, H, W)`` masks in [0, 1] ->
    ``(B, 1, H, W)``. With ``eyelid_weight`` (masks whose last channel is the eyelid band alone), that weight
    inside the eyelid band instead.

    Pixel losses pull an unknowable region to the average of its training targets (for the mouth: a grey fill
    between teeth and cavity); with a low weight there, the perceptual and adversarial terms decide it.
    """
    assert prior_masks.dim() == 4 and prior_masks.shape[1] >= 2, f"prior masks (B, C, H, W), got {prior_masks.shape}"
    band = prior_masks[:, 1:2]
    if eyelid_weight is None:
        return 1.0 - (1.0 - weight) * band
    assert prior_masks.shape[1] >= 3, "eyelid_weight needs the eyelid band as the last prior-mask channel"
    lids = prior_masks[:, -1:]
    mouth = (band - lids).clamp_min(0.0)  # channel 1 is max(mouth, lids); they lie far apart
    return 1.0 - (1.0 - weight) * mouth - (1.0 - eyelid_weight) * lids


def face_l1(error: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """Mean of a ``(B, 3, H, W)`` absolute-error map inside a ``(B, 1, H, W)`` face mask -> scalar."""
    area = face.sum(dim=(1, 2, 3)).clamp_min(1.0) * 3  # (B,), times 3 colour channels
    return (error * face).sum(dim=(1, 2, 3)).div(area).mean()


def patch_mean(values: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """Mean of a critic's ``(B, 1, h, w)`` per-patch values, weighted by ``region`` ``(B, 1, H, W)`` in [0, 1]
    (area-averaged to the patch grid) when given; 0 when the region is empty."""
    if region is None:
        return values.mean()
    weight = F.adaptive_avg_pool2d(region, values.shape[-2:])
    return (weight * values).sum() / weight.sum().clamp_min(1e-6)


def generator_adversarial(fake_scales, real_scales, region=None) -> tuple[torch.Tensor, torch.Tensor]:
    """LSGAN generator term sum_s mean (1 - D_s(fake))² and feature matching sum_s,l mean |f_l(fake) - f_l(real)|,
    from a critic's per-scale ``(features, prediction)`` outputs on the output and (without gradient) the target.
    ``region`` (optional) weights the LSGAN patches (`patch_mean`); feature matching stays unweighted."""
    gan = sum(patch_mean((1 - prediction) ** 2, region) for _, prediction in fake_scales)
    matching = sum(
        (fake_feature - real_feature).abs().mean()
        for (fake_features, _), (real_features, _) in zip(fake_scales, real_scales)
        for fake_feature, real_feature in zip(fake_features, real_features)
    )
    return gan, matching


def critic_loss(real_scales, fake_scales, region=None) -> torch.Tensor:
    """LSGAN critic loss sum_s mean (1 - D_s(real))² + mean D_s(fake)², patches weighted by ``region`` if given."""
    return sum(
        patch_mean((1 - real_map) ** 2, region) + patch_mean(fake_map**2, region)
        for (_, real_map), (_, fake_map) in zip(real_scales, fake_scales)
    )
