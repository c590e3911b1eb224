from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse

import django_satori

from .forms import SignupForm
from .models import Company, Member

#: The action's name as it appears in SATORI's latest-actions list.
ACTION_NAME = "資料請求"
COLLECTION_ROUTE = "[資料請求] example_project"


def signup(request: HttpRequest) -> HttpResponse:
    """Create (or update) the member, and record a 資料請求 action in SATORI.

    The request runs in one transaction (ATOMIC_REQUESTS), so the member, its
    SATORI customer, the outbox row and the action commit together; the
    Celery tasks are queued only after that commit.
    """
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        company = None
        if data["company"].strip():
            company, _created = Company.objects.get_or_create(name=data["company"].strip())
        member = Member.objects.filter(email=data["email"]).first() or Member(
            email=data["email"], source=COLLECTION_ROUTE
        )
        for name, value in form.member_values().items():
            setattr(member, name, value)
        member.company = company
        member.tags = " ".join(sorted({*member.tag_list, *data["interests"]}))
        member.is_active = True
        member.save()
        django_satori.add_action(
            member.email,
            ACTION_NAME,
            content=form.document_label(),
            url=request.build_absolute_uri(reverse("members:signup")),
        )
        return redirect("members:thanks")
    return render(request, "members/signup.html", {"form": form})


def thanks(request: HttpRequest) -> HttpResponse:
    return render(request, "members/thanks.html")
