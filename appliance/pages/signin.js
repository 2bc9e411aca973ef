function showSignIn(message) {
  document.getElementById("content").hidden = true;
  document.getElementById("signin").hidden = false;
  document.getElementById("signout").hidden = true;
  const error = document.getElementById("signin-error");
  error.textContent = message; error.hidden = !message;
  document.getElementById("updated").textContent = "sign-in needed";
  document.body.dataset.signin = "1";
  document.getElementById("signin-key").focus();
}
function hideSignIn() {
  document.getElementById("content").hidden = false;
  document.getElementById("signin").hidden = true;
  document.getElementById("signout").hidden = !sessionStorage.getItem(KEY);
  delete document.body.dataset.signin;
}
document.getElementById("signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("signin-key");
  sessionStorage.setItem(KEY, input.value.trim());
  input.value = "";
  refresh();
});
document.getElementById("signout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  refresh();
});
