"""No views: the benchmarks drive the app from code."""

from __future__ import annotations

from typing import Any

urlpatterns: list[Any] = []
