"""The prompt bound against the real o200k tokenizer, and where the tokenizer is (not) loaded.

The bound (tokens.estimate_text) sizes every hold and token-limit reservation without the 135 MiB
vocabulary; the real count (tokens.count_text) bills usage a provider did not report. These texts
are the evidence for the bound's claims in src/services/tokens.py: at least the real count for
ordinary text in many scripts, not wildly above it, and never far below it for odd text.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from src.services import tokens
from src.services.credits import PROMPT_MARGIN

NORMAL = {
    "english prose": (
        "The gateway sits between an application and the model providers it uses. Each request is "
        "authenticated with an API key, checked against the caller's rate limits, and priced before "
        "it leaves: the gateway holds the most it could cost, calls the cheapest provider that serves "
        "the model, and settles the real cost when the answer is complete. If a provider fails before "
        "the first byte reaches the client, the request moves on to the next one. Nobody pays twice, "
        "and nobody's balance goes below zero, whatever happens to the connection on the way."
    ),
    "chat turn": "Hi! Can you help me write a polite email to my landlord about the broken heater? Thanks :)",
    "short question": "What's 2+2?",
    "python": (
        "async def settle(pool: asyncpg.Pool, hold: Hold, usage: Usage) -> Decimal:\n"
        '    """Charge the real cost and release the hold, in one transaction."""\n'
        "    async with pool.acquire() as conn, conn.transaction():\n"
        "        row = await conn.fetchrow(SETTLE_SQL, hold.id, usage.cost.total)\n"
        "        if row is None:\n"
        '            raise LookupError(f"hold {hold.id} is gone")\n'
        "        return Decimal(row['charged'])\n"
    ),
    "javascript": (
        "export function debounce(fn, waitMs = 250) {\n  let timer = null;\n  return (...args) => {\n"
        "    clearTimeout(timer);\n    timer = setTimeout(() => fn.apply(this, args), waitMs);\n  };\n}\n"
        "const totals = orders.filter((o) => o.status === 'paid').map((o) => o.amountCents / 100);\n"
    ),
    "sql": (
        "SELECT u.id, u.email, sum(t.amount) AS balance\nFROM users u\n"
        "JOIN credit_transactions t ON t.user_id = u.id\nWHERE t.created_at >= now() - interval '30 days'\n"
        "GROUP BY u.id, u.email\nHAVING sum(t.amount) < 0.5\nORDER BY balance ASC\nLIMIT 100;\n"
    ),
    "json": (
        '{"model": "openai/gpt-4o-mini", "messages": [{"role": "system", "content": "You are terse."}, '
        '{"role": "user", "content": "List three colours."}], "temperature": 0.2, "max_tokens": 64, '
        '"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": '
        '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]}'
    ),
    "numbers csv": "id,amount,currency,day\n"
    + "\n".join(f"{i},{i * 37 % 1000}.{i % 100:02d},USD,2026-11-{i % 28 + 1:02d}" for i in range(1, 40)),
    "small integers": "[" + ",".join(str(i * 7 % 10) for i in range(300)) + "]",
    "digits with spaces": " ".join(str(i % 10) for i in range(200)),
    "log lines": "\n".join(
        f"2026-11-26T21:{i:02d}:07.{i * 13:03d}Z INFO gatewayz.chat status=200 ms={i * 3 % 97}"
        f" key=k_{i * 7919:x}"
        for i in range(20)
    ),
    "markdown": (
        "## Results\n\n| scenario | req/s | p50 |\n|---|---|---|\n| nonstream-1 | 609 | 1.50 |\n"
        "| nonstream-64 | 1042 | 47.16 |\n\n- **Note:** the run *shared* the machine.\n"
        "- See `bench/README.md`.\n"
    ),
    "uuids": " ".join(f"{i * 2654435761 % 2**32:08x}-1f2e-4c3d-9a8b-{i * 40503:012x}" for i in range(20)),
    "url": (
        "https://example.com/path/to/resource?query=value&other=123#section-2 and "
        "https://github.com/org/repo/pull/4567/files?w=1"
    ),
    "chinese": (
        "人工智能网关是一种在应用程序和多个大型语言模型提供商之间的中间层。它负责身份验证、速率限制、"
        "计费以及请求路由。当一个提供商出现故障时，网关会自动切换到另一个提供商，从而保证服务的可用性。"
    ),
    "japanese": (
        "このゲートウェイは、複数の言語モデルの提供者に対して一つのAPIを提供します。料金はクレジットで"
        "管理され、各リクエストの前に最大の費用が確保されます。東京の天気は晴れです。"
    ),
    "korean": (
        "이 게이트웨이는 여러 언어 모델 제공자에게 하나의 API를 제공합니다. "
        "요금은 크레딧으로 관리되며 각 요청 전에 잔액이 확보됩니다."
    ),
    "russian": (
        "Шлюз предоставляет единый API для нескольких поставщиков языковых моделей. "
        "Оплата ведётся в кредитах, а перед каждым запросом резервируется сумма на худший случай."
    ),
    "arabic": (
        "توفر البوابة واجهة برمجة تطبيقات واحدة لعدة مزودي نماذج لغوية. "
        "تتم إدارة الرسوم بالأرصدة، ويُحجز المبلغ الأقصى قبل كل طلب."
    ),
    "hindi": ("यह गेटवे कई भाषा मॉडल प्रदाताओं के लिए एक ही एपीआई प्रदान करता है। शुल्क क्रेडिट में प्रबंधित होते हैं।"),
    "thai": "เกตเวย์นี้ให้บริการ API เดียวสำหรับผู้ให้บริการโมเดลภาษาหลายราย ค่าบริการจะคิดเป็นเครดิต",
    "greek": (
        "Η πύλη παρέχει ένα ενιαίο API για πολλούς παρόχους γλωσσικών μοντέλων. Η χρέωση γίνεται σε μονάδες."
    ),
    "german": (
        "Über die Schnittstelle erreicht man mehrere Anbieter großer Sprachmodelle. Die Abrechnung "
        "erfolgt in Guthaben; vor jeder Anfrage wird der ungünstigste Fall reserviert."
    ),
    "french": (
        "La passerelle réserve le coût maximal avant chaque requête, puis débite le coût réel à la "
        "fin : personne ne paie deux fois."
    ),
    "vietnamese": (
        "Cổng này cung cấp một API duy nhất cho nhiều nhà cung cấp mô hình ngôn ngữ. "
        "Phí được tính bằng tín dụng."
    ),
    "amharic": "እሑድ ሰኞ ማክሰኞ ረቡዕ ሐሙስ ዓርብ ቅዳሜ ጃንዩወሪ ፌብሩወሪ ማርች ኤፕሪል",
    "emoji chat": "Great job team!! 🎉🎉 Shipping Friday 🚀🔥 — love it ❤️ 😂😂 👍🏽 👨‍👩‍👧‍👦 🇯🇵🇺🇸 ✅",
    "emoji only": "😀😃😄😁😆😅🤣😂🙂🙃😉😊😇🥰😍🤩😘😗😚😙🥲😋😛😜🤪😝🤑🤗🤭🤫🤔🤐🤨😐😑😶😏😒🙄😬🤥",
}
# Text the bound can under-count, by a quarter at most: the hold's margin covers nearly all of it.
ODD = {
    "regular expression": (
        r"^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
        r"@(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,}$"
    ),
    "base64": (
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg"
    )
    * 6,
    "greek abbreviations": "Κυρ Δευ Τρι Τετ Πεμ Παρ Σαβ Ιαν Φεβ Μαρ Απρ Μαϊ Ιουν Ιουλ Αυγ Σεπ Οκτ Νοε Δεκ",
    "classical chinese": (
        "古人咏雪抽幽思骋妍辞竞险韵偶得一编奇绝辄擅美当时流声后代是以北门之风南山之雅梁园之简黄台之赋"
    ),
}

LATIN_AND_CODE = (
    "english prose",
    "chat turn",
    "python",
    "javascript",
    "sql",
    "json",
    "numbers csv",
    "log lines",
    "markdown",
    "german",
    "french",
)


@pytest.mark.parametrize("name", list(NORMAL))
def test_the_bound_is_at_least_the_real_count_and_at_most_about_twice_it(name: str) -> None:
    text = NORMAL[name]
    real, bound = tokens.count_text(text), tokens.estimate_text(text)
    assert real <= bound <= 2.2 * real, (name, real, bound)


def test_the_bound_stays_close_for_latin_text_and_code() -> None:
    real = sum(tokens.count_text(NORMAL[name]) for name in LATIN_AND_CODE)
    bound = sum(tokens.estimate_text(NORMAL[name]) for name in LATIN_AND_CODE)
    assert real <= bound <= 1.5 * real


@pytest.mark.parametrize("name", list(ODD))
def test_odd_text_is_under_counted_by_a_quarter_at_most(name: str) -> None:
    text = ODD[name]
    real, bound = tokens.count_text(text), tokens.estimate_text(text)
    assert bound >= 0.75 * real, (name, real, bound)
    # The hold's margin brings it back to (nearly) the real count.
    assert bound * PROMPT_MARGIN >= Decimal("0.93") * real


def test_empty_and_tiny_texts() -> None:
    assert tokens.estimate_text("") == tokens.count_text("") == 0
    for text in ("a", "7", "\n", " ", "ok", "é", "日", "🙂", "\ud800"):
        assert tokens.estimate_text(text) >= 1, text
    for text in ("a", "7", "\n", " ", "ok", "é", "日", "🙂"):
        assert tokens.estimate_text(text) >= tokens.count_text(text), text


def test_a_prompt_counts_framing_text_parts_tool_calls_names_and_tools() -> None:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "name": "ada",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny, 21 degrees."},
    ]
    pieces = [
        "You are terse.",
        "What is in this picture?",
        "ada",
        "get_weather",
        '{"city": "Oslo"}',
        "Sunny, 21 degrees.",
        '[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}]',
    ]
    framing = tokens.REPLY_PRIMING_TOKENS + 4 * tokens.MESSAGE_OVERHEAD_TOKENS

    estimate = tokens.estimate_prompt(messages, tools=[tool])
    assert estimate.media_parts == 2
    assert estimate.text_tokens == framing + sum(tokens.estimate_text(p) for p in pieces)
    real = tokens.count_prompt(messages, tools=[tool])
    assert real == framing + sum(tokens.count_text(p) for p in pieces)
    assert real <= estimate.text_tokens


def test_a_long_conversation_is_bounded() -> None:
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": text}
        for i, text in enumerate(NORMAL.values())
    ]
    assert tokens.count_prompt(messages) <= tokens.estimate_prompt(messages).text_tokens


def test_the_tokenizer_loads_only_where_a_real_count_is_needed() -> None:
    """A fresh process: the app, every inference service and the bound leave bpe_openai unimported;
    history that fits by the bound does too; trimming history loads it (off the event loop)."""
    script = textwrap.dedent(
        """
        import asyncio, sys, uuid
        from datetime import datetime, timezone
        from decimal import Decimal

        import src.main  # the whole app, as a worker imports it
        from src.db.history import ChatMessage
        from src.services import chat, history, images, responses, tokens

        def stored(n):
            return [
                ChatMessage(
                    id=uuid.uuid4(), session_id=uuid.uuid4(), role="user",
                    content=f"turn {i}: " + "lorem ipsum " * 8, model=None, tokens=0, cost=Decimal(0),
                    request_id=None, created_at=datetime.now(timezone.utc),
                )
                for i in range(n)
            ]

        request = [{"role": "user", "content": "And now?"}]
        chat.parse_body(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
        tokens.estimate_prompt(request)
        def fit(window):
            return asyncio.run(
                history.fit(stored(20), request, tools=None, context_length=window, output_allowance=50)
            )

        kept = fit(100_000)
        assert len(kept) == 20 and "bpe_openai" not in sys.modules and not tokens.loaded(), "loaded early"
        kept = fit(300)
        assert 0 < len(kept) < 20 and tokens.loaded() and "bpe_openai" in sys.modules, "not loaded"
        print("ok")
        """
    )
    root = Path(__file__).resolve().parents[2]
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


async def test_load_is_shared_and_counts_are_real() -> None:
    await tokens.load()
    await tokens.load()
    assert tokens.loaded()
    assert tokens.count_text("Hello world") == 2
