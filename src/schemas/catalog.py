"""Answers of /catalog and the bodies and answers of /admin/pricing.

Prices are per token (per image, per request for those two fields) and rendered as exact decimal
strings, OpenRouter's convention, so no price ever passes through a float.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, Field, PlainSerializer, field_validator

from src.schemas.chat import MODEL_ID
from src.schemas.common import Strict

# The column is NUMERIC(24, 14): more decimals would be rounded silently and more integer digits
# would overflow, so both are refused. No real price comes near the ceiling.
MAX_PRICE = Decimal("1000")
PRICE_DECIMALS = 14

PriceString = Annotated[
    Decimal,
    PlainSerializer(lambda value: format(value.normalize(), "f"), return_type=str, when_used="json"),
]
PriceInput = Annotated[
    Decimal,
    Field(
        ge=0,
        le=MAX_PRICE,
        decimal_places=PRICE_DECIMALS,
        allow_inf_nan=False,
        description="Credits per unit, as a decimal string or a number; finite and >= 0.",
        examples=["0.000002"],
    ),
]


class ModelPricing(BaseModel):
    prompt: str = Field(description="Credits per prompt token, markup included.", examples=["0.000001"])
    completion: str = Field(description="Credits per completion token, markup included.")
    image: str = Field(description="Credits per generated image.")
    request: str = Field(description="Credits per request.")


class ModelProvider(BaseModel):
    name: str
    pricing: ModelPricing
    context_length: int | None


class ModelEntry(BaseModel):
    id: str = Field(examples=["openai/gpt-4o-mini"])
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    name: str | None
    context_length: int | None
    pricing: ModelPricing = Field(description="What the caller pays at the cheapest provider.")
    providers: list[ModelProvider] = Field(description="Every provider with a price, cheapest first.")


class CatalogProvider(BaseModel):
    name: str = Field(examples=["openrouter"])
    display_name: str = Field(examples=["OpenRouter"])
    enabled: bool = Field(description="Whether this gateway is configured to use the provider.")
    model_count: int = Field(description="Usable (priced) models it serves here.")
    site_url: str | None
    logo_url: str | None


class CatalogProviderList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CatalogProvider]


class EstimateCandidate(BaseModel):
    provider: str
    pricing: ModelPricing


class CostEstimate(BaseModel):
    model: str
    prompt_tokens: int = Field(description="The offline estimate of the prompt's text tokens.")
    max_output_tokens: int = Field(description="The output allowance the hold covers (max tokens x n).")
    worst_case_cost: str = Field(
        description="Exactly what a request with this body would hold against the balance.",
        examples=["0.0330000000"],
    )
    likely_cost: str = Field(
        description="The prompt plus min(max output, 256) tokens per choice at the first provider's price."
    )
    currency: Literal["credits"] = "credits"
    candidates: list[EstimateCandidate] = Field(description="Providers in the order they would be tried.")


class SetPrice(Strict):
    model: str = Field(min_length=1, max_length=256, examples=["openai/gpt-4o-mini"])
    provider: str | None = Field(
        None, min_length=1, max_length=64, description="One provider; null: every provider of the model."
    )
    prompt: PriceInput | None = Field(None, description="Credits per prompt token (before the markup).")
    completion: PriceInput | None = Field(
        None, description="Credits per completion token (before the markup)."
    )
    image: PriceInput | None = Field(None, description="Credits per generated image (before the markup).")
    request: PriceInput | None = Field(None, description="Credits per request (before the markup).")
    free: bool = Field(False, description="Requests cost nothing; prices may then be omitted.")

    @field_validator("model")
    @classmethod
    def _model_id(cls, value: str) -> str:
        if not MODEL_ID.match(value) or ".." in value:
            raise ValueError("the model id contains characters that are not allowed")
        return value


class OverrideOut(BaseModel):
    model: str
    provider: str | None = Field(description="null: the price applies to every provider of the model.")
    prompt: PriceString | None
    completion: PriceString | None
    image: PriceString | None
    request: PriceString | None
    free: bool
    updated_by: str
    updated_at: datetime


class ProviderPrice(BaseModel):
    prompt: PriceString | None
    completion: PriceString | None
    image: PriceString | None
    request: PriceString | None


class EffectivePrice(BaseModel):
    provider: str
    provider_price: ProviderPrice = Field(description="The provider's own quote (null fields: none).")
    override: OverrideOut | None = Field(description="The admin price that applies, if any.")
    effective: ModelPricing | None = Field(
        description="What users pay, markup included; null: unpriced, so the provider is not used."
    )


class PricingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OverrideOut]
    total: int = Field(description="How many overrides match, across all pages.")
    limit: int
    offset: int
    markup: str = Field(description="PRICING_MARKUP, the multiplier on every provider and admin price.")
    model: str | None = None
    effective: list[EffectivePrice] | None = Field(
        None, description="With ?model=: the price per provider of that model."
    )


class PriceUpdated(BaseModel):
    override: OverrideOut
    effective: list[EffectivePrice]
    propagation_seconds: float = Field(
        description="This instance applies the price at once; other instances within this many seconds."
    )
