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
#   $(PREFIX)/lib/sysusers.d/p11p.conf                 group p11p (the socket's group)
#   /etc/p11p/p11p.toml, /etc/p11p/tokens.d/           only when absent; never uninstalled
#   $(PREFIX)/share/doc/p11p/                          README.md, network-HSM drop-in example
# Every path is put under $(DESTDIR). Without DESTDIR, systemd-sysusers (if present)
# creates group p11p.

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
DOCDIR ?= $(PREFIX)/share/doc/p11p
# the interpreter that has the p11p package (for the launcher)
P11P_PYTHON ?= $(shell $(PYTHON) -c 'import sys; print(sys.executable)')

P11P_CONFDIR := $(SYSCONFDIR)/p11p
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
	       "hides (ProtectHome=yes): install p11p with a system Python for the service";; esac
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
	$(INSTALL) -d -m 0755 $(DESTDIR)$(P11P_CONFDIR) $(DESTDIR)$(P11P_CONFDIR)/tokens.d
	@[ -e $(DESTDIR)$(P11P_CONFDIR)/p11p.toml ] && echo "install: $(P11P_CONFDIR)/p11p.toml kept" || \
	  $(INSTALL) -m 0644 packaging/p11p.toml $(DESTDIR)$(P11P_CONFDIR)/p11p.toml
	@[ -e $(DESTDIR)$(P11P_CONFDIR)/tokens.d/example.toml.sample ] || \
	  $(INSTALL) -m 0644 packaging/example.toml.sample $(DESTDIR)$(P11P_CONFDIR)/tokens.d/
	@if [ -z "$(DESTDIR)" ] && command -v systemd-sysusers >/dev/null; then \
	  systemd-sysusers $(SYSUSERS_DIR)/p11p.conf; fi
	@[ -n "$(DESTDIR)" ] || echo "install: done; then: systemctl daemon-reload &&" \
	  "systemctl enable --now p11p.socket"

# Leaves $(P11P_CONFDIR) (the administrator's) and group p11p.
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
	@echo "uninstall: $(P11P_CONFDIR) and group p11p are left in place"
