"""PulseAudio and PipeWire: PCM streams (libpulse), devices (pulsectl), private daemons."""
