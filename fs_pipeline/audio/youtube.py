"""Downloads with the yt-dlp Python API: single videos and playlists, best audio, a download archive so
reruns don't fetch again, retries, and an optional limit on how much of each video is fetched."""

from pathlib import Path

from fs_pipeline import PipelineError


class _Silent:
    """yt-dlp prints errors itself even when quiet; ours is the one line the user sees."""

    def debug(self, message):
        pass

    info = warning = error = debug


def download(urls: list[str], folder: Path, max_seconds: float | None = None) -> list[Path]:
    """Download the audio of `urls` into `folder`; returns every media file there (earlier downloads too)."""
    import yt_dlp
    from yt_dlp.utils import DownloadError, download_range_func

    folder.mkdir(parents=True, exist_ok=True)
    options = {
        "format": "bestaudio/best",
        "outtmpl": str(folder / "%(title).80s [%(id)s].%(ext)s"),
        "download_archive": str(folder / "archive.txt"),
        "retries": 3,
        "fragment_retries": 3,
        "socket_timeout": 20,
        "quiet": True,
        "logger": _Silent(),
        "no_warnings": True,
        "noprogress": False,
        "ignoreerrors": False,
        "restrictfilenames": False,
    }
    if max_seconds is not None:
        options["download_ranges"] = download_range_func(None, [(0, max_seconds)])
        options["force_keyframes_at_cuts"] = False
    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            ydl.download(urls)
    except DownloadError as e:
        message = str(e).replace("ERROR: ", "").splitlines()[0].split(" (caused by")[0]
        raise PipelineError(f"download failed ({message[:200]}): check the URL and your network, then rerun") from e
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix not in (".txt", ".part", ".ytdl") and not p.name.startswith("."))
