// The login page: post the token, the server answers with an HttpOnly cookie.
"use strict";
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = document.getElementById("error");
  error.textContent = "";
  const token = document.getElementById("token").value;
  const response = await fetch("/api/login", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({token}),
    credentials: "same-origin",
  });
  if (response.ok) {
    window.location.assign("/");
    return;
  }
  const body = await response.json().catch(() => ({}));
  error.textContent = body.error || `refused (${response.status})`;
});
