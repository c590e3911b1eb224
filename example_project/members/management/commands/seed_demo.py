"""``manage.py seed_demo``: about fifty members and leads to look at in the demo.

Idempotent: an e-mail address that already exists is left alone, so running
it again creates nothing and sends nothing. A few records carry the kind of
mistakes real data has, so that failures show up in the admin with SATORI's
(or our validation's) reason.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from django_satori import apply_source_changes
from django_satori.models import Customer

from ...models import Company, Member

FAMILY_NAMES = [
    ("佐藤", "サトウ", "sato"),
    ("鈴木", "スズキ", "suzuki"),
    ("高橋", "タカハシ", "takahashi"),
    ("田中", "タナカ", "tanaka"),
    ("伊藤", "イトウ", "ito"),
    ("渡辺", "ワタナベ", "watanabe"),
    ("山本", "ヤマモト", "yamamoto"),
    ("中村", "ナカムラ", "nakamura"),
    ("小林", "コバヤシ", "kobayashi"),
    ("加藤", "カトウ", "kato"),
    ("吉田", "ヨシダ", "yoshida"),
    ("山田", "ヤマダ", "yamada"),
    ("佐々木", "ササキ", "sasaki"),
    ("山口", "ヤマグチ", "yamaguchi"),
    ("松本", "マツモト", "matsumoto"),
]
GIVEN_NAMES = [
    ("太郎", "タロウ", "taro"),
    ("花子", "ハナコ", "hanako"),
    ("翔太", "ショウタ", "shota"),
    ("美咲", "ミサキ", "misaki"),
    ("大輔", "ダイスケ", "daisuke"),
    ("陽子", "ヨウコ", "yoko"),
    ("健一", "ケンイチ", "kenichi"),
    ("由美", "ユミ", "yumi"),
    ("直樹", "ナオキ", "naoki"),
    ("恵", "メグミ", "megumi"),
]
COMPANIES = [
    ("株式会社サンプル商事", "sample-shoji.example.jp"),
    ("みどり工房有限会社", "midori-kobo.example.jp"),
    ("テスト電機株式会社", "test-denki.example.co.jp"),
    ("株式会社さくらソフト", "sakura-soft.example.co.jp"),
    ("北斗物産株式会社", "hokuto.example.jp"),
    ("合同会社あおぞら", "aozora.example.com"),
]
DEPARTMENTS = ["営業部", "マーケティング部", "総務部", "情報システム部", "経営企画室", ""]
SOURCES = ["[資料請求] example_project", "[展示会] 2025 春 東京", "[セミナー] 導入事例紹介"]
TAGS = ["セミナー", "無料トライアル", "個別相談", "展示会"]
MEMBER_COUNT = 45


def member_rows() -> list[dict[str, Any]]:
    """The same members on every run (a fixed random seed)."""
    rnd = random.Random(20250401)
    rows: list[dict[str, Any]] = []
    for i in range(MEMBER_COUNT):
        family = FAMILY_NAMES[i % len(FAMILY_NAMES)]
        given = GIVEN_NAMES[(i * 7) % len(GIVEN_NAMES)]
        company, domain = COMPANIES[i % len(COMPANIES)]
        row: dict[str, Any] = {
            "email": f"{given[2]}.{family[2]}{i:02d}@{domain}",
            "family_name": family[0],
            "family_name_kana": family[1],
            "given_name": given[0],
            "given_name_kana": given[1],
            "company": company,
            "department": rnd.choice(DEPARTMENTS),
            "phone": f"03-{rnd.randint(1000, 9999)}-{rnd.randint(1000, 9999)}",
            "plan": rnd.choice(["free", "free", "standard", "premium"]),
            "newsletter": rnd.random() < 0.7,
            "tags": " ".join(sorted(rnd.sample(TAGS, rnd.randint(0, 2)))),
            "source": rnd.choice(SOURCES),
            "joined_on": dt.date(2025, 4, 1) + dt.timedelta(days=i * 3),
            "is_active": True,
        }
        # Mistakes real data has, so failures are visible in the demo:
        if i % 15 == 7:
            row["plan"] = "gold"  # a retired plan: SATORI's select field has no such choice
        if i % 20 == 13:
            row["source"] = ""  # no collection route: SATORI's bulk API refuses the row
        if i == MEMBER_COUNT - 1:
            row["is_active"] = False  # withdrawn: synced no more, kept in SATORI
        rows.append(row)
    return rows


#: Leads typed in from an exhibition's business cards, straight into Customer.
LEADS: list[dict[str, Any]] = [
    {
        "email": "kimura.ken@expo-lead.example.jp",
        "last_name": "木村",
        "first_name": "健",
        "lead_company_name": "木村精機株式会社",
        "collection_route": "[展示会] 2025 春 東京",
        "delivery_permission": "approval",
        "tags": ["展示会"],
    },
    {
        "email": "hayashi.ai@expo-lead.example.jp",
        "last_name": "林",
        "first_name": "愛",
        "lead_company_name": "林デザイン事務所",
        "collection_route": "[展示会] 2025 春 東京",
        "delivery_permission": "reject",
        "tags": ["展示会"],
    },
    # The admin export's display value instead of the API value: refused locally.
    {
        "email": "shimizu.jun@expo-lead.example.jp",
        "last_name": "清水",
        "first_name": "純",
        "collection_route": "[展示会] 2025 春 東京",
        "delivery_permission": "許可",
    },
    # An item this SATORI account does not have (not in CUSTOM_FIELDS): refused unsent.
    {
        "email": "mori.rina@expo-lead.example.jp",
        "last_name": "森",
        "first_name": "里奈",
        "collection_route": "[展示会] 2025 春 東京",
        "custom_fields": {"custom:visited": "2025年4月1日"},
    },
    # A plan SATORI does not offer as a choice of the custom field.
    {
        "email": "ikeda.sho@expo-lead.example.jp",
        "last_name": "池田",
        "first_name": "翔",
        "collection_route": "[展示会] 2025 春 東京",
        "custom_fields": {"custom:plan": "トライアル"},
    },
]


class Command(BaseCommand):
    help = _("Create about fifty demo members and leads (idempotent).")

    def handle(self, *args: Any, **options: Any) -> None:
        created_members = created_leads = 0
        # One transaction: every sync task is queued once, after the commit.
        with transaction.atomic():
            for row in member_rows():
                company, _created = Company.objects.get_or_create(name=row.pop("company"))
                _member, created = Member.objects.get_or_create(
                    email=row.pop("email"), defaults={**row, "company": company}
                )
                created_members += created
            for lead in LEADS:
                values = dict(lead)
                email = values.pop("email")
                if not Customer.objects.filter(email=email).exists():
                    Customer.objects.create(email=email, **values)
                    created_leads += 1
        # A member's save leaves its SATORI customer to the worker; a seeding script
        # builds them now, so the counts below (and the admin) show them at once.
        apply_source_changes()
        total_members, total_customers = Member.objects.count(), Customer.objects.count()
        # Four counted nouns in one sentence: each is worded for its own number first.
        self.stdout.write(
            _(
                "Demo data: %(members)s and %(leads)s created (%(total_members)s and "
                "%(total_customers)s in all)."
            )
            % {
                "members": ngettext("%(n)d member", "%(n)d members", created_members)
                % {"n": created_members},
                "leads": ngettext("%(n)d lead", "%(n)d leads", created_leads)
                % {"n": created_leads},
                "total_members": ngettext("%(n)d member", "%(n)d members", total_members)
                % {"n": total_members},
                "total_customers": ngettext(
                    "%(n)d SATORI customer", "%(n)d SATORI customers", total_customers
                )
                % {"n": total_customers},
            }
        )
