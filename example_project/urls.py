from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("i18n/", include("django.conf.urls.i18n")),
    path("", include("example_project.members.urls")),
]
# No media route: the bulk CSV files are personal data and are downloaded only
# through the admin (django_satori's bulk job page), never from a public URL.
