# install.mk — `make install` / `make uninstall` (included by the top Makefile, whose
# `install: build` runs `install-files`). Standalone: make -f install.mk install-files.
#
# Layout (PREFIX=/usr/local by default; PREFIX=/usr for a distribution package):
#   $(PREFIX)/lib/<multiarch>/p11p/p11p-client.so      the PKCS#11 module applications load
#   $(PREFIX)/lib/<multiarch>/p11p/p11p-faultsim.so    the fault-injecting module (drills)
#   $(PREFIX)/bin/p11p                                 launcher, unless a p11p is there already
#   /usr/share/p11-kit/modules/p11p.module             p11-kit's module directory (pkg-config
#                                                      p11-kit-1 p11_module_configs): p11-kit
#                                                      reads no other for packages
#   $(PREFIX)/lib/systemd/system/p11p.{service,socket} (systemd reads /usr/local/lib/... too)
#   $(PREFIX)/lib/sysusers.d/p11p.conf                 user and group p11p (the daemon's;
#                                                      the group is also the socket's)
#   /etc/p11p/p11p.toml, /etc/p11p/tokens.d/           only when absent; never uninstalled.
#                                                      Files 0640, folders 2750 (new files
#                                                      get group p11p), root:p11p when
#                                                      group p11p exists: the daemon, user
#                                                      p11p, reads them and cannot write
#   $(PREFIX)/share/doc/p11p/                          README.md, network-HSM drop-in example
# Every path is put under $(DESTDIR). Without DESTDIR, systemd-sysusers (if present)
# creates user and group p11p, and /var/lib/p11p (the service's StateDirectory=) is made
# p11p's at once, so that SoftHSM2 tokens can be made there before the first start.

PREFIX ?= /usr/local
DESTDIR ?=
PYTHON ?= python3
BUILD ?= build
INSTALL ?= install
MULTIARCH ?= $(shell dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || $(CC) -print-multiarch)
BINDIR ?= $(PREFIX)/bin
P11P_LIBDIR ?= $(PREFIX)/lib/$(MULTIARCH)/p11p
P11KIT_MODULEDIR ?= $(shell pkg-config --variable=p11_module_configs p11-kit-1 2>/dev/null || echo /usr/share/p11-kit/modules)
SYSTEMD_UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERS_DIR ?= $(PREFIX)/lib/sysusers.d
SYSCONFDIR ?= /etc
LOCALSTATEDIR ?= /var
DOCDIR ?= $(PREFIX)/share/doc/p11p
# the interpreter that has the p11p package (for the launcher)
P11P_PYTHON ?= $(shell $(PYTHON) -c 'import sys; print(sys.executable)')

P11P_CONFDIR := $(SYSCONFDIR)/p11p
P11P_STATEDIR := $(LOCALSTATEDIR)/lib/p11p
P11P_LAUNCHER_MARK := p11p launcher installed by `make install`

.PHONY: install-files uninstall

install-files:
	@for f in $(BUILD)/p11p-client.so $(BUILD)/p11p-faultsim.so; do \
	  [ -f $$f ] || { echo "install: $$f is missing: run make build first" >&2; exit 1; }; done
	$(INSTALL) -d -m 0755 $(DESTDIR)$(P11P_LIBDIR)
	$(INSTALL) -m 0644 $(BUILD)/p11p-client.so $(BUILD)/p11p-faultsim.so $(DESTDIR)$(P11P_LIBDIR)/
	$(INSTALL) -d -m 0755 $(DESTDIR)$(P11KIT_MODULEDIR)
	sed 's|@P11P_LIBDIR@|$(P11P_LIBDIR)|g' packaging/p11p.module.in \
	  > $(DESTDIR)$(P11KIT_MODULEDIR)/p11p.module
	chmod 0644 $(DESTDIR)$(P11KIT_MODULEDIR)/p11p.module
	@launcher=$(DESTDIR)$(BINDIR)/p11p; \
	if [ -e $$launcher ] && ! grep -qs '$(P11P_LAUNCHER_MARK)' $$launcher; then \
	  echo "install: $$launcher exists (not ours): kept"; \
	else \
	  echo "install: $$launcher -> $(P11P_PYTHON) -m p11p.daemon"; \
	  $(INSTALL) -d -m 0755 $(DESTDIR)$(BINDIR) && \
	  sed 's|@PYTHON@|$(P11P_PYTHON)|g' packaging/p11p.in > $$launcher && chmod 0755 $$launcher; \
	fi
	@case "$(P11P_PYTHON)" in /root/*|/home/*) \
	  echo "install: warning: $(P11P_PYTHON) is under a home directory, which p11p.service" \
	       "hides (ProtectHome=yes) and user p11p may not read: install p11p with a system" \
	       "Python for the service";; esac
	$(INSTALL) -d -m 0755 $(DESTDIR)$(SYSTEMD_UNITDIR)
	sed -e 's|/usr/local/bin/p11p|$(BINDIR)/p11p|g' \
	    -e 's|/usr/local/share/doc/p11p|$(DOCDIR)|g' \
	    -e 's|/etc/p11p/|$(P11P_CONFDIR)/|g' systemd/p11p.service \
	  > $(DESTDIR)$(SYSTEMD_UNITDIR)/p11p.service
	$(INSTALL) -m 0644 systemd/p11p.socket $(DESTDIR)$(SYSTEMD_UNITDIR)/p11p.socket
	chmod 0644 $(DESTDIR)$(SYSTEMD_UNITDIR)/p11p.service
	$(INSTALL) -D -m 0644 packaging/p11p.sysusers $(DESTDIR)$(SYSUSERS_DIR)/p11p.conf
	$(INSTALL) -d -m 0755 $(DESTDIR)$(DOCDIR)
	$(INSTALL) -m 0644 README.md packaging/network-hsm.conf $(DESTDIR)$(DOCDIR)/
	@if [ -n "$(DESTDIR)" ]; then :; elif command -v systemd-sysusers >/dev/null; then \
	  systemd-sysusers $(SYSUSERS_DIR)/p11p.conf; \
	else echo "install: no systemd-sysusers: create user p11p yourself (useradd --system" \
	  "--user-group --home-dir $(P11P_STATEDIR) --shell /usr/sbin/nologin p11p)"; fi
	@conf=$(DESTDIR)$(P11P_CONFDIR); new=; \
	$(INSTALL) -d -m 2750 $$conf $$conf/tokens.d || exit 1; \
	if [ -e $$conf/p11p.toml ]; then echo "install: $(P11P_CONFDIR)/p11p.toml kept"; \
	else $(INSTALL) -m 0640 packaging/p11p.toml $$conf/p11p.toml || exit 1; \
	  new="$$conf/p11p.toml"; fi; \
	if [ ! -e $$conf/tokens.d/example.toml.sample ]; then \
	  $(INSTALL) -m 0640 packaging/example.toml.sample $$conf/tokens.d/ || exit 1; \
	  new="$$new $$conf/tokens.d/example.toml.sample"; fi; \
	if getent group p11p >/dev/null && chgrp p11p $$conf $$conf/tokens.d $$new 2>/dev/null; \
	then :; else echo "install: $(P11P_CONFDIR) is not group p11p's: the daemon (user p11p)" \
	  "reads it once it is (chgrp -R p11p $(P11P_CONFDIR))"; fi
	@if [ -z "$(DESTDIR)" ] && getent passwd p11p >/dev/null; then \
	  $(INSTALL) -d -m 0700 -o p11p -g p11p $(P11P_STATEDIR); fi
	@[ -n "$(DESTDIR)" ] || echo "install: done; then: systemctl daemon-reload &&" \
	  "systemctl enable --now p11p.socket"

# Leaves $(P11P_CONFDIR) (the administrator's), $(P11P_STATEDIR) (the tokens) and user and
# group p11p.
uninstall:
	rm -f $(DESTDIR)$(P11P_LIBDIR)/p11p-client.so $(DESTDIR)$(P11P_LIBDIR)/p11p-faultsim.so
	rmdir $(DESTDIR)$(P11P_LIBDIR) 2>/dev/null || true
	rm -f $(DESTDIR)$(P11KIT_MODULEDIR)/p11p.module
	rm -f $(DESTDIR)$(SYSTEMD_UNITDIR)/p11p.service $(DESTDIR)$(SYSTEMD_UNITDIR)/p11p.socket
	rm -f $(DESTDIR)$(SYSUSERS_DIR)/p11p.conf
	rm -f $(DESTDIR)$(DOCDIR)/README.md $(DESTDIR)$(DOCDIR)/network-hsm.conf
	rmdir $(DESTDIR)$(DOCDIR) 2>/dev/null || true
	@if grep -qs '$(P11P_LAUNCHER_MARK)' $(DESTDIR)$(BINDIR)/p11p; then \
	  rm -f $(DESTDIR)$(BINDIR)/p11p; fi
	@echo "uninstall: $(P11P_CONFDIR), $(P11P_STATEDIR) and user and group p11p are left in place"
