"""The onboarding example: capabilities composed into a user-onboarding workflow."""
