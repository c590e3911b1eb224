"""The customer form: tags and custom fields typed as plain inputs, checked at save time."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client, override_settings
from django.urls import reverse

from django_satori.admin_forms import CustomerAdminForm, custom_form_name
from django_satori.models import Customer

pytestmark = pytest.mark.django_db

ADD = "admin:django_satori_customer_add"
SELECT = {"type": "select", "choices": ["free", "standard", "premium"]}


@pytest.fixture
def root() -> Client:
    User.objects.create_superuser("root", password="pw")
    client = Client()
    client.login(username="root", password="pw")
    return client


def form_data(**extra: str) -> dict[str, str]:
    return {"email": "form@example.jp", "collection_route": "web", "tags": "", **extra}


def test_typed_tags_are_saved_as_a_list_of_strings(root):
    response = root.post(reverse(ADD), form_data(tags="VIP, 重要"))
    assert response.status_code == 302, response.content.decode()[:3000]
    assert Customer.objects.get().tags == ["VIP", "重要"]


def test_full_width_commas_and_repeats_are_one_tag_each():
    form = CustomerAdminForm(data=form_data(tags="VIP，重要, VIP ,, 　展示会　"))
    assert form.is_valid(), form.errors
    assert form.cleaned_data["tags"] == ["VIP", "重要", "展示会"]


def test_a_tag_holding_the_satori_separator_is_refused_at_save_time(root):
    with override_settings(SATORI={**settings.SATORI, "TAG_SEPARATOR": ";"}):
        response = root.post(reverse(ADD), form_data(tags="VIP;重要, 展示会"))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors["tags"]
    assert "VIP;重要" in errors[0] and "TAG_SEPARATOR" in errors[0]
    assert not Customer.objects.exists()


def test_a_tag_holding_a_line_break_is_refused():
    form = CustomerAdminForm(data=form_data(tags="VIP\n重要"))
    assert not form.is_valid()
    assert "line break" in form.errors["tags"][0]


def test_the_tag_input_shows_existing_tags_comma_separated(root):
    customer = Customer.objects.create(email="t@example.jp", tags=["VIP", "重要"])
    html = root.get(reverse("admin:django_satori_customer_change", args=[customer.pk])).content
    assert 'value="VIP, 重要"' in html.decode()
    assert "django_satori/tags.js" in html.decode()


def test_each_declared_custom_field_has_an_input_of_its_type(root):
    fields = {"plan": SELECT, "age": "integer", "birthday": "date", "note": "text"}
    with override_settings(SATORI={**settings.SATORI, "CUSTOM_FIELDS": fields}):
        html = root.get(reverse(ADD)).content.decode()
    assert '<select name="satori_custom__plan"' in html
    assert '<option value="premium">premium</option>' in html
    assert 'type="number" name="satori_custom__age"' in html
    assert 'type="date" name="satori_custom__birthday"' in html
    assert 'type="text" name="satori_custom__note"' in html
    assert 'name="custom_fields"' not in html


def test_custom_field_inputs_are_saved_as_satoris_values(root):
    fields = {"plan": SELECT, "age": "integer", "birthday": "date", "note": "text"}
    data = form_data(
        satori_custom__plan="standard",
        satori_custom__age="42",
        satori_custom__birthday="1990-04-01",
        satori_custom__note="",
    )
    with override_settings(SATORI={**settings.SATORI, "CUSTOM_FIELDS": fields}):
        response = root.post(reverse(ADD), data)
    assert response.status_code == 302, response.content.decode()[:3000]
    assert Customer.objects.get().custom_fields == {
        "custom:plan": "standard",
        "custom:age": 42,
        "custom:birthday": "1990-04-01",
    }


@pytest.mark.parametrize(
    "name, value",
    [
        ("satori_custom__plan", "gold"),
        ("satori_custom__age", "4.5"),
        ("satori_custom__birthday", "1990-02-30"),
    ],
)
def test_bad_custom_values_are_refused_on_their_field(name, value):
    fields = {"plan": SELECT, "age": "integer", "birthday": "date"}
    with override_settings(SATORI={**settings.SATORI, "CUSTOM_FIELDS": fields}):
        form = CustomerAdminForm(data=form_data(**{name: value}))
        assert not form.is_valid()
    assert list(form.errors) == [name]


def test_a_value_of_an_undeclared_field_is_shown_and_must_be_cleared_to_save(root):
    customer = Customer.objects.create(
        email="c@example.jp", custom_fields={"custom:plan": "free", "custom:age": 30}
    )
    fields = {"plan": SELECT}
    url = reverse("admin:django_satori_customer_change", args=[customer.pk])
    base = form_data(email="c@example.jp", satori_custom__plan="premium")
    with override_settings(SATORI={**settings.SATORI, "CUSTOM_FIELDS": fields}):
        html = root.get(url).content.decode()
        assert '<option value="free" selected>free</option>' in html
        assert 'name="satori_custom__undeclared__custom:age" value="30"' in html
        # Kept, SATORI would refuse it on every push: the form says so on its input.
        response = root.post(url, {**base, "satori_custom__undeclared__custom:age": "30"})
        assert response.status_code == 200
        errors = response.context["adminform"].form.errors
        assert list(errors) == ["satori_custom__undeclared__custom:age"]
        assert (
            "Unknown custom field custom:age" in errors["satori_custom__undeclared__custom:age"][0]
        )
        response = root.post(url, {**base, "satori_custom__undeclared__custom:age": ""})
        assert response.status_code == 302
    customer.refresh_from_db()
    assert customer.custom_fields == {"custom:plan": "premium"}


def test_clearing_a_custom_input_removes_its_value():
    customer = Customer.objects.create(email="c@example.jp", custom_fields={"custom:plan": "x"})
    form = CustomerAdminForm(instance=customer, data=form_data(email="c@example.jp"))
    assert form.is_valid(), form.errors
    form.save()
    customer.refresh_from_db()
    assert customer.custom_fields == {}


def test_japanese_messages_for_the_tag_check(client):
    User.objects.create_superuser("root", password="pw")
    client.login(username="root", password="pw")
    response = client.post(reverse(ADD), form_data(tags="VIP\n重要"), HTTP_ACCEPT_LANGUAGE="ja")
    assert "改行" in response.context["adminform"].form.errors["tags"][0]


def test_custom_form_name_is_not_a_model_field():
    assert custom_form_name("plan") not in {f.name for f in Customer._meta.get_fields()}


def test_a_stored_select_value_that_is_not_a_choice_is_shown_and_refused(root):
    customer = Customer.objects.create(email="g@example.jp", custom_fields={"custom:plan": "gold"})
    url = reverse("admin:django_satori_customer_change", args=[customer.pk])
    with override_settings(SATORI={**settings.SATORI, "CUSTOM_FIELDS": {"plan": SELECT}}):
        html = root.get(url).content.decode()
        assert '<option value="gold" selected>gold (not one of the choices)</option>' in html
        response = root.post(url, form_data(email="g@example.jp", satori_custom__plan="gold"))
        assert response.status_code == 200
        errors = response.context["adminform"].form.errors
        assert "free, standard, premium" in errors["satori_custom__plan"][0]
        response = root.post(url, form_data(email="g@example.jp", satori_custom__plan="free"))
        assert response.status_code == 302
    customer.refresh_from_db()
    assert customer.custom_fields == {"custom:plan": "free"}
