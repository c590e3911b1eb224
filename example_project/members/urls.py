from django.urls import path

from . import views

app_name = "members"
urlpatterns = [
    path("", views.signup, name="home"),
    path("signup/", views.signup, name="signup"),
    path("signup/thanks/", views.thanks, name="thanks"),
]
