"""Twilio wire formats: Media Streams messages, TwiML and signatures. No sockets here."""
