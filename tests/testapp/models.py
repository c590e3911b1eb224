from django.db import models


class Member(models.Model):
    """A project model connected to Customer through SATORI['MAPPINGS']."""

    email = models.EmailField(unique=True)
    family_name = models.CharField(max_length=100, blank=True)
    given_name = models.CharField(max_length=100, blank=True)
    company = models.CharField(max_length=100, blank=True)
    plan = models.CharField(max_length=20, blank=True)
    tags = models.CharField(max_length=200, blank=True)

    def __str__(self) -> str:
        return self.email

    @property
    def tag_list(self) -> list[str]:
        return [t for t in self.tags.split() if t]
