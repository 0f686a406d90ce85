-- A contact address the user typed into their profile. It is never verified, so it is kept apart
-- from users.email (verified addresses only) and never used for uniqueness, trials or referrals.
ALTER TABLE users ADD COLUMN contact_email text CHECK (char_length(contact_email) <= 254);
